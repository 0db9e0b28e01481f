"""The CUDA sources of the GPU runtime (qmoefmt.backends.cuda compiles them with CuPy's
NVRTC at first use; the tests compile them with nvcc and g++). Installed as the data
package `qmoefmt_gpu` so a wheel carries them."""
