"""The trainer's parts: the recipes and settings, building the run, the training loop, the
data, what a run keeps on disk, the paper's results and the tables and figures of finished
runs. train.py and plot.py are the commands over them."""
