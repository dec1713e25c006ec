"""`dreambooth ui`: the DreamBooth flow in a browser: the form built from the schema (form.py), the workspace of
runs and jobs (workspace.py), the local server and its page (server.py, static/)."""
