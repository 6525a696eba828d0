"""
Feasibility measurement for the compiled Pyro ELBOs (issue 18; not a library
class, not done): ``pyro.ops.jit.trace`` around ``DisARM_ELBO``'s
``_value_and_surrogate``, the noise drawn with ``torch.rand`` on the global RNG
inside the traced function (a seeded ``torch.Generator``, as the eager path
uses, would be baked into the trace as a constant: the same noise every step).
The first call runs eagerly (structure discovery, broadcasting verdict), then
the step is traced once and replayed.

Measured 2026-12-02 (linear SBN 784-200, random binary data, batch 50, one
thread, shared 2-core CPU, one process, 300 steps, interleaved): eager
``DisARM_ELBO`` 7.33 / 6.44 ms/step, traced 4.98 / 4.86 ms/step; at fixed
parameters four traced steps give four different losses (fresh noise).
Superseded by ``pyro_binary_grads.compiled`` (the ``Jit*`` classes). Kept as the
record of the first measurement; it has the fault the library classes fixed
(2026-12-02): ``torch.jit.trace`` drops the step's ``torch.no_grad()`` regions, so
this replay adds a zero-mean score term to every gradient (see
``compiled._detach_no_grad_values``), and it runs TorchScript's optimizing
executor, slower than eager autograd on CPU (``compiled.py`` docstring).

    python benchmarks/jit_prototype.py
"""
import time, weakref, math, sys
import torch, pyro, pyro.distributions as dist, pyro.ops.jit
from pyro.infer import SVI
import pyro_binary_grads as pbg
from pyro_binary_grads import noise as N
torch.set_num_threads(1)
TRACING = [False]
orig = N.uniform
def uniform(noise, name, index, seed, shape, alpha):
    if TRACING[0] and name not in noise:
        u = torch.rand(shape, dtype=alpha.dtype, device=alpha.device).clamp(min=torch.finfo(alpha.dtype).tiny)
        noise[name] = u
        return u.reshape(shape)
    return orig(noise, name, index, seed, shape, alpha)
N.uniform = uniform

class JitDisARM(pbg.DisARM_ELBO):
    def loss_and_grads(self, model, guide, *args, **kwargs):
        if getattr(self, "_jit", None) is None:
            self._setup(model, guide, args, kwargs)
            self._draw(model, guide, args, kwargs, self.num_particles)  # eager: structure + verdict
            weakself = weakref.ref(self)
            @pyro.ops.jit.trace(ignore_warnings=True)
            def f(*a):
                s = weakself(); TRACING[0] = True
                try:
                    loss, surr = s._value_and_surrogate(model, guide, a, {})
                finally:
                    TRACING[0] = False
                return loss, surr
            self._jit = f
        TRACING[0] = True
        try:
            loss, surr = self._jit(*args)
        finally:
            TRACING[0] = False
        surr.backward()
        return loss.item()

D, H, B = 784, 200, 50
x_all = (torch.rand(2000, D) < 0.3).float()
def model(x):
    W = pyro.param("W", torch.randn(H, D) * 0.01); c = pyro.param("c", torch.zeros(D)); p = pyro.param("p", torch.zeros(H))
    with pyro.plate("data", x.shape[0]):
        b = pyro.sample("b", dist.Bernoulli(logits=p).expand([x.shape[0], H]).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=b @ W + c).to_event(1), obs=x)
def guide(x):
    V = pyro.param("V", torch.randn(D, H) * 0.01); d = pyro.param("d", torch.zeros(H))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("b", dist.Bernoulli(logits=x @ V + d).to_event(1))

def bench(elbo, steps=300):
    pyro.clear_param_store(); pyro.set_rng_seed(0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    t = time.perf_counter(); svi.step(x_all[:B]); first = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        l = svi.step(x_all[(i * B) % 1950:(i * B) % 1950 + B])
    return first, 1000 * (time.perf_counter() - t) / steps, l

for name, e in [("eager", pbg.DisARM_ELBO()), ("jit", JitDisARM()), ("eager", pbg.DisARM_ELBO()), ("jit", JitDisARM())]:
    print(name, bench(e), flush=True)
# noise fresh each step?
pyro.clear_param_store(); e = JitDisARM(); svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), e)
ls = [svi.step(x_all[:B]) for _ in range(4)]; print("losses at fixed params", ls)
