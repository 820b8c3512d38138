"""`python -m lstm_onnx`: the same as the `lstm-onnx` command."""
import sys

from lstm_onnx.cli import main

sys.exit(main())
