"""The modules an injected graph calls: one ``LoraLayer`` per target, holding every adapter.

A graph node ``y = linear(x, W, b)`` becomes ``z = call_module(lora_layer, (x, y))`` with
``z = y + sum over active adapters of scale * B(A(dropout(x)))``. A DoRA adapter (``use_dora``) also needs the
site's weight and bias: its graph node is ``call_module(lora_layer, (x, y, W, b))``. Keeping adapters in a module
(rather than baking them into nodes) lets several adapters share one graph and lets
``set_adapter`` / ``disable_adapter`` switch them without re-capturing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LoraAdapter(nn.Module):
    """One adapter at one site: ``lora_A`` [r, in], ``lora_B`` [out, r] (PEFT's Linear layout)."""

    def __init__(self, kind: str, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float = 0.0, init: bool | str = True, dtype=None, device=None, dora: bool = False):
        super().__init__()
        self.kind, self.r = kind, r
        # A tensor, not a float: swapping in an adapter with another alpha/r then recompiles nothing.
        self.register_buffer("scaling", torch.tensor(float(scale), dtype=torch.float32, device=device), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind != "embedding" else nn.Identity()
        self.reset(init)
        # DoRA's magnitude per output (PEFT's lora_magnitude_vector): set from the base weight by init_magnitude
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device)) if dora else None
        self._norm_cache: tuple | None = None  # ((W's storage, version, shape, strides), ||W_i||^2)

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        """PEFT's DoRA start: the magnitude is the norm of ``W + scale * B @ A`` per output."""
        self.magnitude.copy_(self.weight_norm(weight))

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + scale * B @ A||`` per output (fp32, detached as PEFT does), W in the site's layout, without a
        weight-sized temporary: ``||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i`` (``||W_i||`` kept while W
        is unchanged)."""
        w = weight.detach()
        w = (w if self.kind == "linear" else w.t()).float()  # conv1d holds [in, out]; a view unless W is half
        a, b = self.lora_A[: self.r].detach().float(), self.lora_B[:, : self.r].detach().float()
        if torch.compiler.is_compiling():  # no Python-side cache inside a compiled graph
            rows = torch.linalg.vector_norm(w, dim=1).square()
        else:
            key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride())
            if self._norm_cache is None or self._norm_cache[0] != key:
                self._norm_cache = (key, torch.linalg.vector_norm(w, dim=1).square())
            rows = self._norm_cache[1]
        s = self.scaling
        sq = rows + 2 * s * ((w @ a.t()) * b).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def dora_delta(self, x: torch.Tensor, result: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        """What DoRA adds to ``result`` (the site's output so far): ``(g - 1) * base + g * scale * B(A(x))`` with
        ``g = magnitude / ||W + scale * B @ A||`` (norm detached); base is ``result`` less the bias, or without
        dropout identity in training ``x`` dropped out and multiplied by W again (PEFT's rule)."""
        g = self.magnitude / self.weight_norm(weight).to(self.magnitude.dtype)
        w = weight if self.kind == "linear" else weight.t()
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result if bias is None else result - bias
        else:
            x = self.dropout(x)
            base = F.linear(x, w.to(x.dtype))
        lora = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return (g - 1) * base + g * lora.to(g.dtype) * self.scaling

    @torch.no_grad()
    def reset(self, init: bool | str = True) -> None:
        """PEFT's initialisation: Linear A Kaiming-uniform / B zero; embedding A zero / B normal."""
        if self.kind == "embedding":
            if init is False:
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return F.embedding(x, self.lora_A.t()) @ self.lora_B.t() * self.scaling
        x = self.dropout(x.to(self.lora_A.dtype))
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    @property
    def scale(self) -> float:
        return float(self.scaling)

    @torch.no_grad()
    def pad_to(self, rank: int) -> None:
        """Grow A and B to ``rank`` with zero rows/columns (same output), for hotswapping."""
        extra = rank - self.lora_A.shape[0]
        if extra <= 0:
            return
        a = torch.cat([self.lora_A, self.lora_A.new_zeros(extra, self.lora_A.shape[1])])
        b = torch.cat([self.lora_B, self.lora_B.new_zeros(self.lora_B.shape[0], extra)], dim=1)
        self.lora_A = nn.Parameter(a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)

    @torch.no_grad()
    def swap_in(self, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None) -> None:
        """Copy another adapter's A [r, in], B [out, r] (and DoRA magnitude) into this one's storage (r <= capacity)."""
        r = a.shape[0]
        if magnitude is not None:
            self.magnitude.copy_(magnitude)
        self.lora_A.zero_()
        self.lora_B.zero_()
        self.lora_A[:r].copy_(a)
        self.lora_B[:, :r].copy_(b)
        self.scaling.fill_(scale)
        self.r = r

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scale={self.scale:g}" + (", dora" if self.dora else "")


class LoraLayer(nn.Module):
    """Every adapter of one target module; ``forward(x, base_out)`` adds the active ones."""

    def __init__(self, path: str, kind: str, in_features: int, out_features: int):
        super().__init__()
        self.path, self.kind = path, kind
        self.in_features, self.out_features = in_features, out_features
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()  # adapters already added into the base weight
        self.merged_factors: dict[str, tuple] = {}  # what each merge added: (B, A, scale) as they were then
        self.enabled = True
        # Per-row adapters for one call (PEFT's ``adapter_names``): (names, slot [batch] int64, -1 = base), else None
        self.rows: tuple[tuple[str, ...], torch.Tensor] | None = None

    def shallow_copy(self) -> LoraLayer:
        """A new layer over the same adapter modules (same tensors), with its own adapter table and flags.

        What a pass that adds an adapter works on, so the layer its input graph holds keeps its table.
        """
        new = LoraLayer(self.path, self.kind, self.in_features, self.out_features)
        for name, adapter in self.adapters.items():
            new.adapters[name] = adapter
        new.active, new.merged, new.enabled = self.active, self.merged, self.enabled
        new.merged_factors = dict(self.merged_factors)
        return new

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return base_out
        if self.rows is not None:
            return self._per_row(x, base_out)
        out = base_out
        for name in self.active:
            adapter = self.adapters[name] if name in self.adapters and name not in self.merged else None
            if adapter is None:
                continue
            if adapter.dora:  # PEFT's order: each DoRA adapter sees the output so far as its base result
                out = out + adapter.dora_delta(x, out, weight, bias).to(base_out.dtype)
            else:
                out = out + adapter.delta(x).to(base_out.dtype)
        return out

    @property
    def dora(self) -> bool:
        """Whether any adapter here is DoRA (the graph then passes the site's weight and bias)."""
        return any(a.dora for a in self.adapters.values())

    def _per_row(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Each row gets its own adapter's delta (``rows``); rows of the base, or of an adapter without a branch
        here, get none. Sites that flatten batch and sequence (GPT-2's ``addmm``) see ``batch * n`` rows."""
        names, slot = self.rows
        if x.shape[0] != slot.shape[0]:
            if x.shape[0] % slot.shape[0]:
                raise RuntimeError(f"{self.path}: {x.shape[0]} input rows for a batch of {slot.shape[0]} adapter names")
            slot = slot.repeat_interleave(x.shape[0] // slot.shape[0])
        out = base_out
        for k, name in enumerate(names):
            if name not in self.adapters or name in self.merged:
                continue  # this adapter has no branch here: its rows keep the base output
            rows = (slot == k).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_add(0, rows, self.adapters[name].delta(x.index_select(0, rows)).to(base_out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{self.path}: {self.kind} {self.in_features}->{self.out_features}, active={list(self.active)}"


class SavedTensor(nn.Module):
    """A trainable copy per adapter of one parameter of a ``modules_to_save`` module.

    The graph calls it with no arguments; it returns the active adapter's copy, or the
    original tensor when no adapter with a copy is active or adapters are disabled.
    """

    def __init__(self, path: str, original: torch.Tensor):
        super().__init__()
        self.path = path
        self._original = [original]  # a list, so the base parameter is not registered twice
        self.copies = nn.ParameterDict()
        self.active: tuple[str, ...] = ()
        self.enabled = True

    @property
    def original(self) -> torch.Tensor:
        return self._original[0]

    def add(self, name: str) -> None:
        self.copies[name] = nn.Parameter(self.original.detach().clone(), requires_grad=True)

    def shallow_copy(self) -> SavedTensor:
        """A new module over the same copies (same tensors), with its own table and flags."""
        new = SavedTensor(self.path, self.original)
        for name, copy in self.copies.items():
            new.copies[name] = copy
        new.active, new.enabled = self.active, self.enabled
        return new

    def forward(self) -> torch.Tensor:
        if self.enabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original


class IA3Vector(nn.Module):
    """One (IA)^3 adapter at one site: ``ia3_l`` [1, in] (feed-forward: scales the input) or [out, 1] (scales the
    output), PEFT's layout; ones at the start (``init_ia3_weights``), else random normal as PEFT draws."""

    def __init__(self, size: int, feedforward: bool, init: bool = True, dtype=None, device=None):
        super().__init__()
        shape = (1, size) if feedforward else (size, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device) if init
                                  else torch.randn(shape, dtype=dtype, device=device))


class IA3Layer(nn.Module):
    """Every (IA)^3 adapter of one target module. Output sites: ``call_module(layer, (x, y))`` returns ``y * l``;
    feed-forward sites: ``call_module(layer, (x,))`` feeds ``x * l`` to the linear in place of ``x``."""

    def __init__(self, path: str, kind: str, in_features: int, out_features: int, feedforward: bool):
        super().__init__()
        self.path, self.kind, self.feedforward = path, kind, feedforward
        self.in_features, self.out_features = in_features, out_features
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.merged_factors: dict[str, torch.Tensor] = {}  # what each merge multiplied by
        self.enabled = True

    def shallow_copy(self) -> IA3Layer:
        new = IA3Layer(self.path, self.kind, self.in_features, self.out_features, self.feedforward)
        for name, adapter in self.adapters.items():
            new.adapters[name] = adapter
        new.active, new.merged, new.enabled = self.active, self.merged, self.enabled
        new.merged_factors = dict(self.merged_factors)
        return new

    def scaling(self) -> torch.Tensor | None:
        """The product of the active unmerged adapters' vectors, flat; None when there is none."""
        out = None
        for name in self.active:
            if name in self.adapters and name not in self.merged:
                vector = self.adapters[name].ia3_l.flatten()
                out = vector if out is None else out * vector
        return out

    def weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` shaped to multiply the base weight: along its outputs (rows of Linear's [out, in], columns of
        Conv1D's [in, out]) or, feed-forward, its inputs."""
        along_rows = (self.kind == "linear") != self.feedforward
        return vector.reshape(-1, 1) if along_rows else vector.reshape(1, -1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.scaling() if self.enabled else None
        if self.feedforward:
            return x if scale is None else (x.to(scale.dtype) * scale).to(x.dtype)
        return base_out if scale is None else (base_out * scale).to(base_out.dtype)

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else "output"
        return f"{self.path}: (IA)^3 on the {where}, {self.kind} {self.in_features}->{self.out_features}"


class PromptEmbeddings(nn.Module):
    """Every prompt-tuning adapter of a model: ``adapters[name]`` holds its virtual tokens' embeddings [n, dim]
    (PEFT's ``prompt_embeddings``), put in front of the input's embeddings while that adapter is active."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ParameterDict()
        self.active: tuple[str, ...] = ()
        self.enabled = True
        self.path = "prompt_embeddings"

    def prompt(self) -> torch.Tensor | None:
        """The active adapter's embeddings, or None (disabled, or no prompt adapter active)."""
        if not self.enabled:
            return None
        return next((self.adapters[n] for n in self.active if n in self.adapters), None)
