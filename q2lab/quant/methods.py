"""Imports every built-in method module so that each registers itself by name."""

from q2lab.quant import aqlm, auto, butterfly, gptq, mixed, quarot, quip, rtn, spinquant, upq, vptq  # noqa: F401
from q2lab.quant.ggml import filetype as ggml_filetype  # noqa: F401
from q2lab.quant.ggml import quantizer as ggml_quantizer  # noqa: F401
from q2lab.quant.qtip import method as qtip_method  # noqa: F401
