"""Upcycling's distillation warm-up (arXiv 2603.06351 v1): the frozen pretrained DiT teaches the upcycled DC-DiT.

The teacher sees the student's own noisy input x_t at its own patch size, with its own embedders and positions;
each kept student token is matched to the teacher's token of the patch that contains it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.errors import DCDiTError


def containing_patch(position: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """Raster index, on a patch-`patch` DiT's token grid, of the patch containing each grid position (raster index
    on the side x side patch-1 grid)."""
    rows, cols = torch.div(position, side, rounding_mode="floor"), position % side
    return torch.div(rows, patch, rounding_mode="floor") * (side // patch) + torch.div(cols, patch,
                                                                                      rounding_mode="floor")


class BlockDistiller:
    """MSE between the student's DiT-block outputs at its kept tokens and the frozen teacher's block outputs at the
    patches containing them, the teacher run on the same x_t, timesteps and (class-dropped) labels.

    Hooks on the student capture what one forward pass saw: x_t (its patch embed's input), t, the labels after
    class dropout (its label table's input), each kept token's grid position (`positions`' input), the packing and
    every block's output. `loss()` then runs the teacher once, mean over blocks of the MSE. A trainer adds
    `weight * loss()` for the warm-up steps, then `close()`s it. Before this, the teacher's blocks were run on the
    student's own kept tokens: at step 0 that loss was ~0 and no teacher signal reached the new scaffold.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        _check_pair(student, teacher)
        self.teacher = teacher
        self.side = student.config.input_size
        self.patch = teacher.config.patch_size
        self.captured: dict = {}
        self.outputs: list[torch.Tensor] = []
        hooks = [(student.x_embedder, "x"), (student.t_embedder, "t"), (student.y_embedder.embedding_table, "labels"),
                 (student.positions, "position")]
        self._handles = [module.register_forward_pre_hook(self._capture(name)) for module, name in hooks]
        self._handles.append(student.blocks[0].register_forward_pre_hook(self._capture_packing))
        self._handles += [block.register_forward_hook(self._capture_output) for block in student.blocks]

    def _capture(self, name: str):
        def hook(module, args):
            self.captured[name] = args[0].detach()
        return hook

    def _capture_packing(self, module, args):
        self.captured["packing"] = args[2]
        self.outputs = []  # the blocks are about to run: this forward's outputs start here

    def _capture_output(self, module, args, output):
        self.outputs.append(output)

    def targets(self) -> list[torch.Tensor]:
        """(T, d) per block: the teacher's output at the patch containing each of the student's T kept tokens."""
        if len(self.captured) < 5 or len(self.outputs) != len(self.teacher.blocks):
            raise RuntimeError("BlockDistiller.loss() needs a student forward pass first")
        c = self.captured
        with torch.no_grad():
            per_block = self.teacher.block_outputs(c["x"], c["t"], c["labels"])  # each (B, n_teacher, d)
            n_teacher = per_block[0].shape[1]
            index = c["packing"].sample_index * n_teacher + containing_patch(c["position"], self.side, self.patch)
            return [out.reshape(-1, out.shape[-1]).index_select(0, index) for out in per_block]

    def loss(self) -> torch.Tensor:
        targets = self.targets()
        losses = [F.mse_loss(out.float(), target.float()) for out, target in zip(self.outputs, targets, strict=True)]
        self.captured, self.outputs = {}, []
        return torch.stack(losses).mean()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.config, teacher.config
    if len(student.blocks) != len(teacher.blocks):
        raise DCDiTError(f"the teacher has {len(teacher.blocks)} blocks, the student {len(student.blocks)}")
    if (s.hidden_size, s.input_size) != (t.hidden_size, t.input_size):
        raise DCDiTError(f"the teacher (width {t.hidden_size}, grid {t.input_size}) and the student (width "
                         f"{s.hidden_size}, grid {s.input_size}) must share width and input grid")


__all__ = ["BlockDistiller", "containing_patch"]
