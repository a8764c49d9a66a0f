"""The method protocol is complete and the only way in: both methods implement all of it, the trainer and the
evaluators reach the draft and its weights only through it, and PARD's export state is exactly the draft's."""

from __future__ import annotations

import ast
import inspect

import torch

from pard_train.core.attention import AttentionBackend
from pard_train.methods import Method
from pard_train.methods.pard import PardMethod
from pard_train.methods.pard2 import Pard2Method
from pard_train.testing.tiny import build_tiny_model
from pard_train.training import evaluators, train


def _protocol_members() -> set[str]:
    annotated = set(Method.__annotations__)
    defined = {name for name in vars(Method) if not name.startswith("_")}
    return annotated | defined


def test_both_methods_implement_the_whole_protocol():
    members = _protocol_members()
    assert {"objective", "draft", "prepare", "zero_stats", "export_state", "resume_settings"} <= members
    for method in (PardMethod, Pard2Method):
        missing = {name for name in members - {"objective"} if not hasattr(method, name)}
        assert not missing, f"{method.__name__} lacks {missing}"


def test_pard_export_state_is_the_drafts_own_state_dict():
    draft = build_tiny_model(128, attn_implementation="sdpa")
    method = PardMethod(draft, AttentionBackend.sdpa, 4)
    assert method.draft is draft
    exported, pard2 = method.export_state(method.objective.state_dict())
    assert pard2 is None and exported.keys() == draft.state_dict().keys()
    assert all(torch.equal(exported[name], value) for name, value in draft.state_dict().items())
    stats = method.zero_stats(4, torch.device("cpu"))
    assert stats.count.shape == (4,) and not stats.count.any()


def test_the_trainer_and_evaluators_name_no_attribute_of_a_methods_module():
    """``.draft`` is read from the method (``self.method.draft``), never from the module it trains, and no key prefix
    of the objective's state dict is spelled outside the methods."""
    for module in (train, evaluators):
        name, source = module.__name__, inspect.getsource(module)
        assert '"draft."' not in source, name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr == "draft":
                owner = node.value
                assert isinstance(owner, ast.Attribute) and owner.attr == "method", f"{name}:{node.lineno}"
