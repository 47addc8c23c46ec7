/*
 * Arithmetic on one RNS limb of a CKKS polynomial: the negacyclic number-theoretic
 * transform and a pointwise multiply-accumulate, modulo a prime q < 2^62.
 *
 * SEAL does this work too, but sealapi only hands polynomials to Python one
 * coefficient at a time, so the enclave's decryptions and encryptions went through
 * Python lists and zstd-compressed temporary files. These kernels work on numpy
 * buffers in place. Every multiplier is a fixed table entry or a key coefficient,
 * so each comes with its Shoup companion floor(w * 2^64 / q) and a product costs
 * two multiplications and no division.
 *
 * Twiddles are in bit-reversed order: w[k] = psi^bitrev(k) for the forward transform
 * and psi^-bitrev(k) for the inverse, with psi SEAL's own primitive 2n-th root, so
 * the forward transform's output order is SEAL's NTT form. Values outside [0, q)
 * give wrong numbers, never out-of-bounds access: every length is checked here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef unsigned __int128 u128;

/* x * w mod q, up to one q too large: the result is in [0, 2q) for any 64-bit x and w < q. */
static inline uint64_t mul_shoup_lazy(uint64_t x, uint64_t w, uint64_t w_shoup, uint64_t q)
{
    uint64_t hi = (uint64_t)(((u128)x * w_shoup) >> 64);
    return x * w - hi * q;
}

/* x - bound if x >= bound; branch-free, because on random residues a branch is mispredicted half the time. */
static inline uint64_t below(uint64_t x, uint64_t bound)
{
    return x - (bound & -(uint64_t)(x >= bound));
}

static inline uint64_t mul_shoup(uint64_t x, uint64_t w, uint64_t w_shoup, uint64_t q)
{
    return below(mul_shoup_lazy(x, w, w_shoup, q), q);
}

/*
 * Harvey's butterflies: values stay in [0, 4q) (forward) or [0, 2q) (inverse) between
 * stages and are reduced once at the end, which q < 2^62 leaves room for.
 */
static void forward(uint64_t *a, size_t n, const uint64_t *w, const uint64_t *ws, uint64_t q)
{
    uint64_t two_q = 2 * q;
    size_t t = n;
    for (size_t m = 1; m < n; m <<= 1) {
        t >>= 1;
        for (size_t i = 0; i < m; i++) {
            uint64_t *x = a + 2 * i * t, *y = x + t;
            uint64_t root = w[m + i], root_shoup = ws[m + i];
            for (size_t j = 0; j < t; j++) {
                uint64_t u = below(x[j], two_q), v = mul_shoup_lazy(y[j], root, root_shoup, q);
                x[j] = u + v;
                y[j] = u + two_q - v;
            }
        }
    }
    for (size_t j = 0; j < n; j++)
        a[j] = below(below(a[j], two_q), q);
}

static void inverse(uint64_t *a, size_t n, const uint64_t *w, const uint64_t *ws, uint64_t q, uint64_t n_inv,
                    uint64_t n_inv_shoup)
{
    uint64_t two_q = 2 * q;
    size_t t = 1;
    for (size_t m = n; m > 2; m >>= 1) {
        size_t h = m >> 1;
        for (size_t i = 0; i < h; i++) {
            uint64_t *x = a + 2 * i * t, *y = x + t;
            uint64_t root = w[h + i], root_shoup = ws[h + i];
            for (size_t j = 0; j < t; j++) {
                uint64_t u = x[j], v = y[j];
                x[j] = below(u + v, two_q);
                y[j] = mul_shoup_lazy(u + two_q - v, root, root_shoup, q);
            }
        }
        t <<= 1;
    }
    /* The last stage folds in the scaling by 1/n, which saves a pass over the polynomial. */
    uint64_t root = (uint64_t)(((u128)w[1] * n_inv) % q);
    uint64_t root_shoup = (uint64_t)(((u128)root << 64) / q);
    uint64_t *x = a, *y = a + t;
    for (size_t j = 0; j < t; j++) {
        uint64_t u = x[j], v = y[j];
        x[j] = mul_shoup(u + v, n_inv, n_inv_shoup, q);
        y[j] = mul_shoup(u + two_q - v, root, root_shoup, q);
    }
}

static void release(Py_buffer *bufs, int count)
{
    for (int i = 0; i < count; i++)
        PyBuffer_Release(&bufs[i]);
}

/*
 * The number of uint64 values in each of `count` buffers, or 0 with a ValueError set and the
 * buffers released: they must be equally long (a power of two for a transform) and q below 2^62,
 * the headroom Harvey's butterflies need.
 */
static size_t checked(Py_buffer *bufs, int count, unsigned long long q, int transform, const char *what)
{
    size_t n = (size_t)bufs[0].len / sizeof(uint64_t);
    const char *problem = NULL;
    for (int i = 0; i < count; i++)
        if (bufs[i].len != bufs[0].len || bufs[i].len % sizeof(uint64_t) != 0)
            problem = "every buffer must hold the same number of uint64 values";
    if (transform && (n < 2 || (n & (n - 1)) != 0))
        problem = "the length must be a power of two";
    if (q < 2 || q >> 62)
        problem = "the modulus must lie in [2, 2^62)";
    if (problem == NULL)
        return n;
    PyErr_Format(PyExc_ValueError, "%s: %s.", what, problem);
    release(bufs, count);
    return 0;
}

static PyObject *ntt_forward(PyObject *self, PyObject *args)
{
    Py_buffer b[3];
    unsigned long long q;
    if (!PyArg_ParseTuple(args, "w*y*y*K", &b[0], &b[1], &b[2], &q))
        return NULL;
    size_t n = checked(b, 3, q, 1, "ntt_forward");
    if (n == 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    forward(b[0].buf, n, b[1].buf, b[2].buf, q);
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

static PyObject *ntt_inverse(PyObject *self, PyObject *args)
{
    Py_buffer b[3];
    unsigned long long q, n_inv, n_inv_shoup;
    if (!PyArg_ParseTuple(args, "w*y*y*KKK", &b[0], &b[1], &b[2], &q, &n_inv, &n_inv_shoup))
        return NULL;
    size_t n = checked(b, 3, q, 1, "ntt_inverse");
    if (n == 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    inverse(b[0].buf, n, b[1].buf, b[2].buf, q, n_inv, n_inv_shoup);
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

static PyObject *multiply_accumulate(PyObject *self, PyObject *args)
{
    Py_buffer b[4];
    unsigned long long q;
    if (!PyArg_ParseTuple(args, "w*y*y*y*K", &b[0], &b[1], &b[2], &b[3], &q))
        return NULL;
    size_t n = checked(b, 4, q, 0, "multiply_accumulate");
    if (n == 0)
        return NULL;
    uint64_t *acc = b[0].buf;
    const uint64_t *x = b[1].buf, *w = b[2].buf, *ws = b[3].buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t j = 0; j < n; j++)
        acc[j] = below(acc[j] + mul_shoup(x[j], w[j], ws[j], q), q);
    Py_END_ALLOW_THREADS
    release(b, 4);
    Py_RETURN_NONE;
}

/* One output and one input buffer, element by element: the shape of add, reduce and centered. */
typedef void (*pointwise_fn)(void *out, const void *in, size_t n, uint64_t q);

static PyObject *pointwise(PyObject *args, const char *what, pointwise_fn fn)
{
    Py_buffer b[2];
    unsigned long long q;
    if (!PyArg_ParseTuple(args, "w*y*K", &b[0], &b[1], &q))
        return NULL;
    size_t n = checked(b, 2, q, 0, what);
    if (n == 0)
        return NULL;
    fn(b[0].buf, b[1].buf, n, q);
    release(b, 2);
    Py_RETURN_NONE;
}

static void add_into(void *out, const void *in, size_t n, uint64_t q)
{
    uint64_t *acc = out;
    const uint64_t *x = in;
    for (size_t j = 0; j < n; j++)
        acc[j] = below(acc[j] + x[j], q);
}

/* Signed integers (int64) to residues in [0, q). */
static void reduce_signed(void *out, const void *in, size_t n, uint64_t q)
{
    uint64_t *r = out;
    const int64_t *x = in;
    for (size_t j = 0; j < n; j++) {
        uint64_t rest = (x[j] < 0 ? -(uint64_t)x[j] : (uint64_t)x[j]) % q;
        r[j] = x[j] < 0 && rest ? q - rest : rest;
    }
}

/* Residues in [0, q) as the integers of least absolute value they stand for, as doubles. */
static void center(void *out, const void *in, size_t n, uint64_t q)
{
    double *d = out;
    const uint64_t *x = in;
    for (size_t j = 0; j < n; j++)
        d[j] = x[j] > q / 2 ? -(double)(q - x[j]) : (double)x[j];
}

static PyObject *add(PyObject *self, PyObject *args)
{
    return pointwise(args, "add", add_into);
}

static PyObject *reduce(PyObject *self, PyObject *args)
{
    return pointwise(args, "reduce", reduce_signed);
}

static PyObject *centered(PyObject *self, PyObject *args)
{
    return pointwise(args, "centered", center);
}

static PyMethodDef methods[] = {
    {"ntt_forward", ntt_forward, METH_VARARGS,
     "ntt_forward(a, roots, roots_shoup, q): a's negacyclic NTT in place (SEAL's order)."},
    {"ntt_inverse", ntt_inverse, METH_VARARGS,
     "ntt_inverse(a, inv_roots, inv_roots_shoup, q, n_inv, n_inv_shoup): the inverse NTT in place."},
    {"multiply_accumulate", multiply_accumulate, METH_VARARGS,
     "multiply_accumulate(acc, x, w, w_shoup, q): acc = acc + x * w mod q, pointwise, in place."},
    {"add", add, METH_VARARGS, "add(acc, x, q): acc = acc + x mod q, pointwise, in place."},
    {"reduce", reduce, METH_VARARGS, "reduce(out, x, q): out = x mod q in [0, q) for int64 x."},
    {"centered", centered, METH_VARARGS, "centered(out, x, q): out = x or x - q, whichever is smaller, as doubles."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rns", "Kernels on one RNS limb of a CKKS polynomial.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__rns(void)
{
    return PyModule_Create(&module);
}
