import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from toys import TokenNet, make_sets


@pytest.fixture
def token_net() -> TokenNet:
    return TokenNet()


@pytest.fixture
def sets():
    return make_sets()
