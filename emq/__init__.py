"""emq: multi-bit quantized networks trained at the cost of one."""
from .config import ConfigError, DataConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, load_config
from .data import DataError, load_data
from .evaluation import evaluate, evaluate_bits, recalibrate_bn
from .layers import set_bits
from .quantizers import correct_weight_bias, quantize_activation, quantize_weight
from .results import ResultsStore, Run
from .models import load_trained
from .training import train

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "QuantConfig", "RunConfig", "TrainConfig", "load_config",
           "DataError", "load_data", "evaluate", "evaluate_bits", "recalibrate_bn", "set_bits",
           "correct_weight_bias", "quantize_activation", "quantize_weight", "ResultsStore", "Run",
           "load_trained", "train"]
