"""The package's own metadata."""
from importlib import metadata

import qna_detr


def test_version_is_the_installed_distributions():
  assert qna_detr.__version__ == metadata.version('qna-detr')
  assert qna_detr.__version__.count('.') == 2
