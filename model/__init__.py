"""byolfast's model: ResNet encoders, BYOL heads, the BYOL module and its fused EMA. Knows nothing of data."""
from model.byol import Byol, ByolOutput, build_byol, collapse_std, regression_loss
from model.config import ModelConfig
from model.ema import EmaPairs, ema_update_, ema_update_loop_
from model.resnet import RESNETS, build_encoder, encoder_state_dict

__all__ = ["Byol", "ByolOutput", "EmaPairs", "ModelConfig", "RESNETS", "build_byol", "build_encoder", "collapse_std",
           "ema_update_", "ema_update_loop_", "encoder_state_dict", "regression_loss"]
