# This `nvidia` comes first on sys.path when FASTGAL_NO_DALI=1 (tests/conftest.py). It stands in for the
# installed `nvidia` package (a plain package, so a namespace portion would be ignored) and extends its
# search path with every other `nvidia` folder: nvidia.cudnn, nvidia.nccl, ... load as usual, while
# nvidia.dali is found here first and fails to import.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
