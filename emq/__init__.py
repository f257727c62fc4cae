"""emq: multi-bit quantized networks trained at the cost of one."""
from emq.analysis.evaluation import evaluate, evaluate_bits, recalibrate_bn
from emq.config import ConfigError, DataConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig, load_config
from emq.data.load import load_data
from emq.errors import DataError
from emq.nn.layers import set_bits
from emq.nn.models import load_trained
from emq.quant.quantizers import correct_weight_bias, quantize_activation, quantize_weight
from emq.results import ResultsStore, Run
from emq.training.loop import train

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "QuantConfig", "RunConfig", "TrainConfig", "load_config",
           "DataError", "load_data", "evaluate", "evaluate_bits", "recalibrate_bn", "set_bits",
           "correct_weight_bias", "quantize_activation", "quantize_weight", "ResultsStore", "Run",
           "load_trained", "train"]
