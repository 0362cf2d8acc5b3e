"""What both stages of treg stand on: the scored folder's contract, the forward kernel, precision
names, errors, output folders, atomic writes and the command-line builder. It imports neither
stage; stage one (`treg_data`) and stage two (`treg_train`) import it and never each other."""

__version__ = "0.1.0"
