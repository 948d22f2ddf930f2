#include "sgmv.cuh"
LORAPLEX_INSTANTIATE(__half)
