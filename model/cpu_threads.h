// cpu_threads.h -- one knob for the CPU backend's threads (OpenMP loops and OpenBLAS GEMMs), and
// OpenBLAS's choice of kernels.
#pragma once

#include <string>

namespace bmoe::model {

// n <= 0 means OMP_NUM_THREADS if set, else all cores. Sets both OpenMP's and OpenBLAS's thread counts.
void set_cpu_threads(int n);
int cpu_threads();

// OpenBLAS picks its kernels when it loads. Debian 12's OpenBLAS (0.3.21) does not know some newer
// x86 CPUs (seen: a Sapphire Rapids VM) and falls back to its generic Prescott kernels, which run
// sgemm about 7x slower. Where OPENBLAS_CORETYPE is unset and OpenBLAS chose a generic core on a
// CPU with AVX-512 or AVX2 + FMA, this sets OPENBLAS_CORETYPE to those kernels and re-executes the
// program with the same arguments (so call it first in main, before MPI_Init). Returns otherwise,
// also when the re-execution fails (the run goes on with the slow kernels).
void use_fast_openblas_kernels(char** argv);
// The OPENBLAS_CORETYPE for a CPU with these features on which OpenBLAS chose `detected`, or ""
// where its choice stands (a known core, or no wider vector unit to offer).
std::string better_openblas_core(const std::string& detected, bool avx512, bool avx2_fma);
// The kernels OpenBLAS runs ("SkylakeX", "Haswell", "Prescott" ...), for run logs.
std::string openblas_kernels();

}  // namespace bmoe::model
