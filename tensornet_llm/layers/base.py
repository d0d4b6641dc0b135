"""Shared machinery of the tensor-network drop-in replacements for ``nn.Linear``.

A subclass says how its cores are laid out (:meth:`TensorNetworkLinear._network`) and how a
dense matrix is decomposed into them (:meth:`TensorNetworkLinear._decompose`); everything else --
argument checking, site shapes and padding, initialisation, forward, ``to_dense``, counting,
serialisable layout -- lives here.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ArgumentTypeError
from .contract import (
    DispatchTable, NetworkSpec, Strategy, dispatch_table, reconstruct, tn_linear, tune_version,
)
from .decompose import BondSpectrum
from .factorize import factorize

__all__ = ["TensorNetworkLinear", "DispatchCache", "linear_weight", "is_linear_like", "check_int",
           "is_plain", "dequantized"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight stored (in, out), attribute ``nf`` = out.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass) or Hugging Face's GPT-2 ``Conv1D``, with a 2-D weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return False
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def is_plain(t: Tensor) -> bool:
    """``t`` is a ``Tensor`` or ``nn.Parameter`` itself, not a subclass (such as a weight torchao
    or bitsandbytes has quantized)."""
    return type(t) in (Tensor, nn.Parameter)


def dequantized(t: Tensor) -> Tensor:
    """``t`` as a plain float tensor: a weight torchao has quantized (a tensor subclass, such
    as its ``Int8Tensor``) dequantized, any other as it is."""
    return t if is_plain(t) else t.dequantize()


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of a linear-like module, weight always as ``(out_features, in_features)``."""
    if not is_linear_like(module):
        raise ArgumentTypeError(
            f"module must be nn.Linear or transformers' Conv1D, got {type(module).__name__}"
        )
    weight = module.weight.t() if _is_conv1d(module) else module.weight
    return weight, module.bias


def _legacy_core_names(module, state_dict, prefix, *_args) -> None:
    """Earlier versions kept the cores in an ``nn.ParameterList`` (``cores.0``, ...): rename
    those keys of a state dict being loaded to ``core0``, ..."""
    for key in [k for k in state_dict if k.startswith(prefix + "cores.")]:
        index = key[len(prefix) + len("cores."):]
        if index.isdigit():
            state_dict[f"{prefix}core{index}"] = state_dict.pop(key)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value``, checked to be an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve_shape(
    name: str, features: int, shape: Sequence[int] | None, n_sites: int
) -> tuple[tuple[int, ...], int]:
    """Explicit site shape (validated) or the automatic factorisation; returns (shape, padded)."""
    if shape is None:
        return factorize(features, n_sites)
    shape = tuple(shape)
    if len(shape) != n_sites or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
    ):
        raise ArgumentError(
            f"{name} must be {n_sites} positive integers (one per site), got {shape!r}"
        )
    if math.prod(shape) != features:
        raise ArgumentError(
            f"{name}={shape} multiplies to {math.prod(shape)}, but the layer has {features} "
            f"features; the product must equal the feature count"
        )
    return shape, features


class DispatchCache(nn.Module):
    """Keeps a layer's :class:`~tensornet_llm.layers.contract.DispatchTable` between calls.

    A subclass says how its table is decided (:meth:`_decide_dispatch`); the table is kept until
    the measured choices change (:func:`~tensornet_llm.layers.contract.tune_version`) or the
    module moves (``.to()``, ``.half()``), and is decided again right then, outside any
    ``torch.compile`` trace. Under ``torch.compile`` the kept table is read as it stands.
    """

    def _decide_dispatch(self) -> DispatchTable:
        raise NotImplementedError

    def _forget_dispatch(self) -> None:
        self.__dict__["_dispatch_state"] = (None, None)

    def _cached_dispatch(self) -> DispatchTable:
        key, table = self.__dict__.get("_dispatch_state", (None, None))
        if table is not None and (key == tune_version() or torch.compiler.is_compiling()):
            return table
        table = self._decide_dispatch()
        self.__dict__["_dispatch_state"] = (tune_version(), table)
        return table

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half(): measured choices belong to a device and dtype, so decide again
        # (now, not at the next call, which may be inside a torch.compile trace)
        result = super()._apply(fn, recurse)
        self._forget_dispatch()
        self._cached_dispatch()
        return result


class TensorNetworkLinear(DispatchCache):
    """Base class: ``y = x W^T + b`` with ``W`` stored as a tensor network.

    Args:
        in_features: size of each input row.
        out_features: size of each output row.
        chi: maximum bond dimension (``>= 1``); larger keeps more of the weight.
        n_sites: number of sites the feature dimensions are split over (default 3, or the
            length of ``in_shape`` / ``out_shape``).
        bias: learn an additive bias (kept dense).
        in_shape, out_shape: explicit leg sizes per site; their products must equal
            ``in_features`` / ``out_features``. By default balanced centre-heavy factors are chosen
            (see :func:`tensornet_llm.layers.factorize.factorize`; awkward sizes are zero-padded).
        bond_dims: explicit bond dimensions (each ``<= chi``); default: the largest allowed.
        strategy: ``"auto"`` (cheaper by FLOPs per call), ``"network"`` or ``"dense"``.
        device, dtype: as for ``nn.Linear``.

    Shapes:
        input ``(..., in_features)`` -> output ``(..., out_features)``.
    """

    method: ClassVar[str]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        chi: int,
        n_sites: int | None = None,
        bias: bool = True,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        bond_dims: Sequence[int] | None = None,
        strategy: Strategy = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.chi = check_int("chi", chi, 1)
        (self.n_sites, self.in_shape, self.padded_in, self.out_shape, self.padded_out,
         self.spec) = self._geometry(in_features, out_features, chi, n_sites, in_shape, out_shape,
                                     bond_dims)
        factory = {"device": device, "dtype": dtype}
        self._register_cores([nn.Parameter(torch.empty(shape, **factory))
                              for shape in self._parameter_shapes(self.spec)])
        self._register_load_state_dict_pre_hook(_legacy_core_names, with_module=True)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        #: Singular values kept / discarded at each bond when built by :meth:`from_linear`.
        self.spectra: list[BondSpectrum] | None = None
        self.strategy = strategy  # also decides the dispatch table (see the property)
        if self.cores[0].device.type != "meta":  # meta tensors hold no values to initialise
            self.reset_parameters()

    @classmethod
    def _geometry(
        cls, in_features: int, out_features: int, chi: int, n_sites: int | None,
        in_shape: Sequence[int] | None, out_shape: Sequence[int] | None,
        bond_dims: Sequence[int] | None,
    ) -> tuple[int, tuple[int, ...], int, tuple[int, ...], int, NetworkSpec]:
        """Validated ``(n_sites, in_shape, padded_in, out_shape, padded_out, spec)``."""
        given = [len(s) for s in (in_shape, out_shape) if s is not None]
        if n_sites is None:
            n_sites = given[0] if given else 3
        check_int("n_sites", n_sites, 1)
        if any(g != n_sites for g in given):
            raise ArgumentError(
                f"n_sites={n_sites} disagrees with the length of in_shape/out_shape ({given})"
            )
        in_shape, padded_in = _resolve_shape("in_shape", in_features, in_shape, n_sites)
        out_shape, padded_out = _resolve_shape("out_shape", out_features, out_shape, n_sites)
        site_dims = [o * i for o, i in zip(out_shape, in_shape)]
        limits = cls._max_bond_dims(site_dims, chi)
        if bond_dims is None:
            bond_dims = limits
        else:
            bond_dims = [int(b) for b in bond_dims]
            if len(bond_dims) != len(limits) or any(
                not 1 <= b <= lim for b, lim in zip(bond_dims, limits)
            ):
                raise ArgumentError(
                    f"bond_dims must be {len(limits)} integers with 1 <= bond_dims[k] <= {limits}, "
                    f"got {bond_dims}"
                )
        spec = cls._network(out_shape, in_shape, tuple(bond_dims))
        return n_sites, in_shape, padded_in, out_shape, padded_out, spec

    @classmethod
    def count_parameters(
        cls, in_features: int, out_features: int, chi: int, n_sites: int | None = None,
        bias: bool = True, *, in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
    ) -> int:
        """:attr:`num_parameters` of the layer these arguments would build, without building it
        (the budget search asks this many thousands of times)."""
        *_, spec = cls._geometry(check_int("in_features", in_features, 1),
                                 check_int("out_features", out_features, 1),
                                 check_int("chi", chi, 1), n_sites, in_shape, out_shape, None)
        cores = sum(math.prod(shape) for shape in cls._parameter_shapes(spec))
        return cores + (out_features if bias else 0)

    # ----- the cores ----------------------------------------------------------------------------
    def _register_cores(self, cores: Sequence[nn.Parameter]) -> None:
        """The cores as the layer's own parameters ``core0``, ``core1``, ... (not a child
        module): hooks on the layer (accelerate's offloading, ``device_map``) then move them
        with the layer's call."""
        self._n_cores = len(cores)
        for k, core in enumerate(cores):
            self.register_parameter(f"core{k}", core)

    @property
    def cores(self) -> tuple[nn.Parameter, ...]:
        """The cores in network order (see the subclass for their legs)."""
        return tuple(self._parameters[f"core{k}"] for k in range(self._n_cores))

    # ----- what a subclass defines ------------------------------------------------------------
    @staticmethod
    def _network(
        out_shape: tuple[int, ...], in_shape: tuple[int, ...], bond_dims: tuple[int, ...]
    ) -> NetworkSpec:
        raise NotImplementedError

    @staticmethod
    def _parameter_shapes(spec: NetworkSpec) -> tuple[tuple[int, ...], ...]:
        """Stored shape of each core; by default the operand shapes of the network."""
        return spec.core_shapes

    def _operands(self, cores: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The cores (default: this layer's) as the contraction's operands; views, so autograd
        flows back to them."""
        return list(self.cores if cores is None else cores)

    @staticmethod
    def _max_bond_dims(site_dims: Sequence[int], chi: int) -> list[int]:
        raise NotImplementedError

    @staticmethod
    def _decompose(
        weight: Tensor, out_shape: Sequence[int], in_shape: Sequence[int], chi: int,
        tol: float | None,
    ) -> tuple[list[Tensor], list[BondSpectrum]]:
        raise NotImplementedError

    @staticmethod
    def _bond_dims_of(cores: Sequence[Tensor]) -> list[int]:
        raise NotImplementedError

    # ----- construction ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Random cores whose product has ``nn.Linear``'s weight variance ``1 / (3 in_features)``.

        ``W[o, i]`` is a sum of ``prod(bond_dims)`` products of one entry from every core, so
        i.i.d. normal cores with variance ``(sigma^2 / prod(bond_dims)) ** (1 / n_cores)`` give
        ``Var W = sigma^2`` (the same variance as the default init of ``nn.Linear``).
        """
        target = 1.0 / (3.0 * self.in_features)
        n_terms = math.prod(self.bond_dims)
        std = (target / n_terms) ** (0.5 / len(self.cores))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        chi: int,
        n_sites: int | None = None,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        tol: float | None = None,
        strategy: Strategy = "auto",
    ) -> "TensorNetworkLinear":
        """Decompose a trained ``nn.Linear`` (or GPT-2 ``Conv1D``) into a tensor network.

        The weight is decomposed in float64 if it is float64 and in float32 otherwise, then the
        cores are stored in the layer's dtype and device. The bias is copied unchanged.

        Args:
            chi: maximum bond dimension kept at every bond.
            tol: optional relative Frobenius tolerance; bonds may keep fewer than ``chi``
                singular values as long as ``||W - W_hat||_F <= tol * ||W||_F``.
        """
        weight, bias = linear_weight(linear)
        return cls.from_weight(
            weight, bias, chi, n_sites, in_shape=in_shape, out_shape=out_shape, tol=tol,
            strategy=strategy,
        )

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        chi: int,
        n_sites: int | None = None,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        tol: float | None = None,
        strategy: Strategy = "auto",
    ) -> "TensorNetworkLinear":
        """Like :meth:`from_linear`, from a weight ``(out_features, in_features)`` and bias."""
        if weight.dim() != 2:
            raise ArgumentError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
        if tol is not None and not (isinstance(tol, (int, float)) and 0 <= tol < 1):
            raise ArgumentError(f"tol must be a float in [0, 1) or None, got {tol!r}")
        out_features, in_features = weight.shape
        n_sites, in_shape, padded_in, out_shape, padded_out, _ = cls._geometry(
            in_features, out_features, check_int("chi", chi, 1), n_sites, in_shape, out_shape,
            None,
        )
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            padded = weight.new_zeros((padded_out, padded_in), dtype=compute)
            padded[:out_features, :in_features] = weight.detach()
            cores, spectra = cls._decompose(padded, out_shape, in_shape, chi, tol)
        layer = nn.utils.skip_init(  # no random init: every value is overwritten below
            cls, in_features, out_features, chi, n_sites, bias=bias is not None,
            in_shape=in_shape if padded_in == in_features else None,
            out_shape=out_shape if padded_out == out_features else None,
            bond_dims=cls._bond_dims_of(cores), strategy=strategy,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            for param, core in zip(layer.cores, cores):
                param.copy_(core)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        layer.spectra = [BondSpectrum(s.kept.cpu(), s.discarded.cpu()) for s in spectra]
        return layer

    # ----- computation -------------------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        """``"auto"`` (per batch size: measured by :func:`~tensornet_llm.autotune` where it was
        run, else the cost model), ``"network"`` or ``"dense"``. Setting it redecides the
        dispatch table."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: Strategy) -> None:
        if value not in ("auto", "network", "dense"):
            raise ArgumentError(f"strategy must be 'auto', 'network' or 'dense', got {value!r}")
        self.__dict__["_strategy"] = value
        self._forget_dispatch()
        self._cached_dispatch()

    def dispatch_table(self, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> DispatchTable:
        """How each batch size is computed: a :class:`~tensornet_llm.layers.contract.DispatchTable`
        decided in advance, so a call costs a few integer comparisons and traces under
        ``torch.compile`` without graph breaks. It follows the strategy and the choices
        :func:`~tensornet_llm.autotune` measured for the cores' device and dtype (or the ones
        given); in eager mode it is redecided when those change. Under ``torch.compile`` it is
        read as it stands, so run ``autotune`` before compiling."""
        if device is None and dtype is None:  # the layer's own: kept until .to() or a tuning
            return self._cached_dispatch()
        ref = self.cores[0]
        return dispatch_table(self.spec, self._strategy, ref.device if device is None else device,
                              ref.dtype if dtype is None else dtype)

    def _decide_dispatch(self) -> DispatchTable:
        ref = self.cores[0]
        return dispatch_table(self.spec, self._strategy, ref.device, ref.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features) -> (..., out_features)``."""
        if x.shape[-1] != self.in_features:
            raise ArgumentError(
                f"input's last dimension must be in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        return tn_linear(x, self.spec, self._operands(), self.bias, self.in_features,
                         self.out_features, table=self.dispatch_table())

    def _set_cores(self, cores: Sequence[Tensor]) -> None:
        """Replace the cores by tensors of the same layout and possibly other bond dimensions
        (new parameters, same ``requires_grad``); the structure follows."""
        bond_dims = self._bond_dims_of(list(cores))
        self.spec = self._network(self.out_shape, self.in_shape, tuple(bond_dims))
        self.chi = max(self.chi, *bond_dims) if bond_dims else self.chi
        grad = self.cores[0].requires_grad
        for k in range(self._n_cores):
            delattr(self, f"core{k}")
        self._register_cores([nn.Parameter(c.detach(), requires_grad=grad) for c in cores])
        self.spectra = None
        self._forget_dispatch()

    def to_dense(self) -> Tensor:
        """The weight this network represents, ``(out_features, in_features)``."""
        return self.dense_from(self.cores)

    def dense_from(self, cores: Sequence[Tensor]) -> Tensor:
        """The ``(out_features, in_features)`` weight of this layer's structure with the given
        cores (same shapes as :attr:`cores`), e.g. candidate cores inside an optimiser."""
        full = reconstruct(self.spec, self._operands(cores))
        return full[: self.out_features, : self.in_features]

    @property
    def weight(self) -> Tensor:
        """The dense weight ``(out_features, in_features)``, materialised on each access.

        Present because model code reads ``layer.weight`` of the linears it owns (T5 casts its
        activations to ``wo.weight.dtype``); it costs one contraction of the cores, and
        gradients flow back to them. It is not a parameter and not in the state dict.
        """
        return self.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (same device and dtype)."""
        ref = self.cores[0]
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def measure_spectra(self) -> list[BondSpectrum]:
        """Singular values across every bond of the *current* weight (e.g. after fine-tuning).

        Re-decomposes :meth:`to_dense` exactly, so the values are the Schmidt coefficients of the
        operator the layer computes now; ``discarded`` is empty up to the bond dimension.
        """
        with torch.no_grad():
            dense = reconstruct(self.spec, self._operands())
            compute = torch.float64 if dense.dtype == torch.float64 else torch.float32
            full = max(self.padded_in * self.padded_out, 1)
            _, spectra = self._decompose(dense.to(compute), self.out_shape, self.in_shape, full, None)
        return [BondSpectrum(s.values[:b].cpu(), s.values[b:].cpu())
                for s, b in zip(spectra, self.bond_dims)]

    # ----- bookkeeping -------------------------------------------------------------------------
    @property
    def bond_dims(self) -> tuple[int, ...]:
        return tuple(self._bond_dims_of(list(self.cores)))

    @property
    def num_parameters(self) -> int:
        """Parameters stored: all cores plus the bias."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_parameters(self) -> int:
        """Parameters of the equivalent ``nn.Linear`` (weight plus bias)."""
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    @property
    def compression_ratio(self) -> float:
        """Dense weight size over core size (bias excluded); ``> 1`` means smaller."""
        return self.in_features * self.out_features / sum(c.numel() for c in self.cores)

    def layout(self) -> dict[str, Any]:
        """Everything needed to rebuild this module's structure (JSON-serialisable)."""
        return {
            "method": self.method,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "chi": self.chi,
            "n_sites": self.n_sites,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "bond_dims": list(self.bond_dims),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_layout(
        cls, layout: dict[str, Any], device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TensorNetworkLinear":
        """Rebuild an (uninitialised-weight) module from :meth:`layout`."""
        in_f, out_f = layout["in_features"], layout["out_features"]
        layer = cls(
            in_f, out_f, layout["chi"], layout["n_sites"], bias=layout["bias"],
            in_shape=layout["in_shape"] if math.prod(layout["in_shape"]) == in_f else None,
            out_shape=layout["out_shape"] if math.prod(layout["out_shape"]) == out_f else None,
            bond_dims=layout["bond_dims"], device=device, dtype=dtype,
        )
        if list(layer.in_shape) != list(layout["in_shape"]) or list(layer.out_shape) != list(
            layout["out_shape"]
        ):
            raise ArgumentError(f"layout's padded shapes cannot be reproduced: {layout}")
        return layer

    def extra_repr(self) -> str:
        pad = ""
        if self.padded_in != self.in_features or self.padded_out != self.out_features:
            pad = f", padded=({self.padded_out}, {self.padded_in})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, chi={self.chi}, "
            f"bond_dims={self.bond_dims}, bias={self.bias is not None}{pad}, "
            f"compression={self.compression_ratio:.2f}x"
        )
