// Stand-in for the CUDA toolkit's <cuda_runtime.h> in emulator builds: everything the kernels may use
// from it is declared by cuda_emu.h.
#pragma once
#include "cuda_emu.h"
