"""`dreambooth ui`: the DreamBooth flow in a browser (in progress: the form built from the schema)."""
