"""The toy world: procedural captioned images, analytic judges, a bundled tiny SD pipeline and subjects.

world.py renders and captions scenes; judges.py reads them back from pixels; subjects.py holds the two-tone
subjects; pretrain.py trains the base model; measure.py samples and scores; demo.py is `dreambooth demo`.
"""
