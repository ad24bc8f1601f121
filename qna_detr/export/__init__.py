"""Exports: backbone features of a dataset (`features`) and the serialized detector."""
