"""torch.compile of a whole model gives the eager loss and gradients (slow: inductor on the CPU)."""
from tests.helpers.models import randomized_model
from tests.unit.models.test_memory_paths import _assert_same, _loss_and_grads


def test_compiled_model_gives_the_eager_loss_and_gradients():
    """torch.compile in place (state dict keys unchanged) with the chunked loss; dropout off,
    as compiled dropout draws other masks than eager."""
    eager = randomized_model("pgm-tiny", dropout=0.0, loss_chunk=32)
    compiled = randomized_model("pgm-tiny", dropout=0.0, loss_chunk=32)
    compiled.compile()  # ~30 s on 2 CPU cores
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    _assert_same(_loss_and_grads(compiled), _loss_and_grads(eager), atol=1e-5)
