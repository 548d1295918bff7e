// Portability macros for the kernel cores: every function in csrc/include/widetopo is
// plain C++ on scalars and raw pointers, callable from host code (CPU kernels, ctest)
// and from CUDA device code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define WIDETOPO_HD __host__ __device__ __forceinline__
#else
#define WIDETOPO_HD inline
#endif
