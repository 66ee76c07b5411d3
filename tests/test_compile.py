"""torch.compile over a TopK SAE built from both ops."""

import torch

import ssae_kernels


class TinySAE(torch.nn.Module):
    def __init__(self, d, M, k):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.randn(M, d) / d**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(M))
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = torch.nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        values, indices = ssae_kernels.topk_encode(x, self.W_enc, self.b_enc, self.k, b_dec=self.b_dec)
        x_hat = ssae_kernels.sparse_decode(values, indices, self.W_dec, self.b_dec)
        return ((x_hat - x) ** 2).sum(-1).mean()


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    sae = TinySAE(16, 96, 4)
    x = torch.randn(33, 16)
    eager_loss = sae(x)
    eager_grads = torch.autograd.grad(eager_loss, list(sae.parameters()))
    compiled = torch.compile(sae, fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
