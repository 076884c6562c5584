"""Messages a new-user trial found unhelpful: each says what was wrong and what to do."""

import pytest

import mctl
from mctl.exception import InvalidError

app = mctl.App("trial-messages")


@app.cls()
class WithInit:
    def __init__(self, x):
        self.x = x

    @mctl.method()
    def go(self):
        return self.x


@app.cls()
class NoParams:
    @mctl.method()
    def go(self):
        return 1


def test_a_class_with_its_own_init_is_pointed_to_modal_parameter():
    for call in (lambda: WithInit(3), lambda: WithInit(x=3)):
        with pytest.raises(InvalidError) as info:
            call()
        text = str(info.value)
        assert "__init__(self, x)" in text and "Modal deprecates a custom __init__" in text
        assert "`x: int = modal.parameter()`" in text and "WithInit(x=...)" in text
    with pytest.raises(InvalidError, match=r"it declares none: .*`name: str = modal.parameter\(\)`"):
        NoParams(3)
    with pytest.raises(InvalidError, match=r"its parameters are none \(declare one in the class "
                                           r"body as `y: str = modal.parameter\(\)`\)"):
        NoParams(y=3)


def test_sandbox_keywords_get_a_did_you_mean_as_app_function_does():
    """Refused before anything is asked of a control plane (none runs here)."""
    with pytest.raises(InvalidError, match=r"Sandbox.create\(\) got an unknown keyword 'timout'. "
                                           r"Did you mean 'timeout'\?"):
        mctl.Sandbox.create(app=app, timout=5)
    with pytest.raises(InvalidError, match=r"Sandbox.create\(\) got an unknown keyword 'wrkdir'. "
                                           r"Did you mean 'workdir'\?"):
        mctl.Sandbox.create(wrkdir="/tmp")
