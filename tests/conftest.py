"""Lets test modules import the shared references next to them."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent / 'layers'))
