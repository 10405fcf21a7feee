"""Float8 linear layers for ``--precision fp8``: the float8 tensor cores of an H100 or H200.

A frozen Linear layer's weights are scaled to float8 once per output row, the activations per row at each
call, and ``torch._scaled_mm`` multiplies them into bf16. ``check_fp8`` refuses a GPU without such cores.
"""

from __future__ import annotations

import torch

from histoembed.core.errors import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [M, K] as float8 and their float32 scales [M, 1]: each row's largest value maps to FP8_MAX."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class Float8Linear(torch.nn.Module):
    """A frozen Linear layer in float8: weights scaled per output row once, activations per row at each call,
    multiplied by ``torch._scaled_mm`` into bf16 (the float8 tensor cores of an H100 or H200)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight, scale = fp8_scales(linear.weight.detach())
        self.register_buffer("weight", weight)                   # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = fp8_scales(x.reshape(-1, x.shape[-1]))
        try:
            y = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                                 out_dtype=torch.bfloat16)
        except RuntimeError as e:  # a torch build or device without this float8 kernel
            raise UserError(f"float8 matrix products fail on {x.device} with this torch build ({str(e)[:200]})",
                            hint="use --precision bf16") from None
        return y.reshape(*x.shape[:-1], self.out_features)


def to_float8(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every Linear layer whose sides are multiples of 16 (what ``_scaled_mm`` takes) in float8."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, Float8Linear(child))
        else:
            to_float8(child)
    return module


def check_fp8(device: torch.device) -> None:
    """Refuse fp8 on a GPU without float8 tensor cores (compute capability below 8.9)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(f"--precision fp8 needs a GPU of compute capability 8.9 or more (H100, H200, L4, L40); "
                        f"{torch.cuda.get_device_name(device)} has "
                        f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}",
                        hint="use --precision bf16 (the default on CUDA)")

