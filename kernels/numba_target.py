"""The Numba target the CPU kernels compile for: Numba's own CPU target, but
with 512-bit vectors on Intel's AVX-512 cores from Ice Lake on.

LLVM's tuning for Intel's AVX-512 server cores (Skylake-SP to Emerald Rapids)
sets ``prefer-256-bit``: its loop vectoriser then fills ymm registers, half
of what the core's two 512-bit FMA units take. On a 2-core Emerald Rapids the
d = 1 forward ran 0.19 ns/pair so, and 0.113 with zmm (forward + backward 0.61
and 0.33). AMD's Zen 4 and Zen 5 tunings never set it, and without AVX-512
the flag changes nothing, so only Intel's cores from Ice Lake on compile
differently (KEEP_256_BIT: the older ones keep LLVM's choice).

A target of its own (``numba.core.target_extension``) rather than
``NUMBA_CPU_FEATURES``: that setting is the whole process's, and would change
the code of every other Numba user in it. Overloads and intrinsics that target
``generic`` or ``cpu`` serve this target too (it is a kind of CPU).
"""

import functools

import numba
from numba.core import codegen, cpu, externals, registry, utils
from numba.core.target_extension import (
    CPU,
    dispatcher_registry,
    jit_registry,
    target_override,
    target_registry,
)
from numba.core.utils import threadsafe_cached_property

NAME = "nwfast_cpu"


# Skylake-SP and its refreshes slow their clock for 512-bit work, and their
# parts with one 512-bit FMA unit gain no lanes a cycle: LLVM's choice stands.
KEEP_256_BIT = frozenset({"skylake-avx512", "cascadelake", "cooperlake"})


class _Codegen(codegen.JITCPUCodegen):
    def _customize_tm_features(self):
        features = super()._customize_tm_features()
        wide = "+avx512f" in features.split(",")
        if wide and self._get_host_cpu_name() not in KEEP_256_BIT:
            features += ",-prefer-256-bit"
        return features


class _Context(cpu.CPUContext):
    def init(self):
        # CPUContext.init with this codegen
        self.is32bit = utils.MACHINE_BITS == 32
        self._internal_codegen = _Codegen("nwfast.exec")
        externals.c_math_functions.install(self)


class _Target(registry.CPUTarget):
    @threadsafe_cached_property
    def _toplevel_target_context(self):
        return _Context(self.typing_context, self._target_name)


class _Dispatcher(registry.CPUDispatcher):
    targetdescr = _Target(NAME)

    def compile(self, sig):
        # Lowering that types a call of its own (an array's view, say) asks
        # for the thread's current target, Numba's CPU unless overridden.
        with target_override(NAME):
            return super().compile(sig)


class NwfastCPU(CPU):
    """The target's place in Numba's hierarchy: under CPU."""


# Numba's registries take a name once: a second copy of this module (a reload)
# leaves the first copy's target in place.
if NAME not in target_registry:
    target_registry[NAME] = NwfastCPU
    dispatcher_registry[NwfastCPU] = _Dispatcher
    # What an overload's implementation compiles with when this target calls it.
    jit_registry[NwfastCPU] = functools.partial(numba.jit, _target=NAME)


def features() -> str:
    """The LLVM features the kernels compile with (for reports)."""
    dispatcher = dispatcher_registry[target_registry[NAME]]
    return dispatcher.targetdescr.target_context.codegen()._tm_features
