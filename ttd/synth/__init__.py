"""TagMask-Synth: the embedded default corpus, a deterministic image-text world with exact tags and masks."""

from ttd.synth.captions import ALT_TEXT, MULTI_OBJECT, CaptionStyle
from ttd.synth.generate import GENERATOR_VERSION, SynthConfig, make_sample, synthesize
from ttd.synth.vocabulary import build_vocabulary

__all__ = ["ALT_TEXT", "MULTI_OBJECT", "CaptionStyle", "GENERATOR_VERSION", "SynthConfig", "build_vocabulary",
           "make_sample", "synthesize"]
