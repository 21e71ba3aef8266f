"""kd_ref: reference implementations of knowledge distillation for dense prediction."""
