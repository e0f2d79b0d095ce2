"""byolfast's model: ResNet encoders, BYOL heads, the BYOL module and its fused EMA. Knows nothing of data."""
from byolfast.model.byol import Byol, ByolOutput, build_byol, collapse_std, regression_loss
from byolfast.model.config import ModelConfig
from byolfast.model.ema import EmaPairs, ema_update_, ema_update_loop_
from byolfast.model.resnet import RESNETS, build_encoder, encoder_state_dict

__all__ = ["Byol", "ByolOutput", "EmaPairs", "ModelConfig", "RESNETS", "build_byol", "build_encoder", "collapse_std",
           "ema_update_", "ema_update_loop_", "encoder_state_dict", "regression_loss"]
