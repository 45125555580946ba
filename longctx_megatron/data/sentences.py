"""Sentence splitting for ``tools/preprocess_data.py --split-sentences``, as Megatron-LM splits.

Megatron splits with NLTK's Punkt model for ``--lang`` (downloaded at run time) and, with
``--keep-newlines``, the same parameters under language variables whose period context swallows the
whitespace after a sentence end, so that newlines stay with the sentence they follow. The text is
split in slices of 1,000,000 characters, each on its own.

Nothing is downloaded here. When NLTK's Punkt tables for ``--lang`` are installed (``punkt_tab``, what
``nltk.download("punkt_tab")`` fetches; NLTK no longer loads the old pickles), they are used and the
sentences are Megatron's. Otherwise Punkt runs untrained: its rule-based defaults (a sentence ends
at ``.``, ``?`` or ``!`` followed by whitespace and a token, with no learned abbreviations, so "Mr. Smith"
splits after "Mr."), and ``describe()`` says so. NLTK itself is required: without it a clear error asks
for ``pip install nltk``.
"""

from __future__ import annotations

SLICE_CHARACTERS = 1_000_000  # Megatron splits each slice of this many characters on its own


def _keep_newlines_vars():
    from nltk.tokenize.punkt import PunktLanguageVars

    class KeepNewlines(PunktLanguageVars):
        """Punkt's period context with the whitespace after the sentence end matched (``\\s*``) inside the
        sentence, instead of being required before the next token: newlines stay in the text."""

        _period_context_fmt = r"""
            \S*                          # the word material before the end
            %(SentEndChars)s             # a possible sentence end
            \s*                          # and the whitespace after it, kept with this sentence
            (?=(?P<after_tok>
                %(NonWord)s              # then punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    return KeepNewlines()


class SentenceSplitter:
    """``split(text)`` -> the sentences of ``text`` (see the module doc)."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        try:
            from nltk.tokenize import punkt
        except ImportError as error:
            raise ImportError("--split-sentences needs the nltk package (pip install nltk)") from error
        self.lang, self.keep_newlines = lang, keep_newlines
        try:
            trained = punkt.PunktTokenizer(lang)
            params, self.trained = trained._params, True
        except (LookupError, OSError, ValueError):
            params, self.trained = None, False
        lang_vars = _keep_newlines_vars() if keep_newlines else punkt.PunktLanguageVars()
        if params is None:
            self._punkt = punkt.PunktSentenceTokenizer(lang_vars=lang_vars)
        elif keep_newlines:
            self._punkt = punkt.PunktSentenceTokenizer(train_text=params, lang_vars=lang_vars)
        else:
            self._punkt = trained

    def describe(self) -> str:
        model = f"NLTK Punkt tables for {self.lang!r}" if self.trained else (
            f"untrained NLTK Punkt (no punkt_tab data for {self.lang!r} installed: rule-based ends, no "
            "learned abbreviations)")
        return model + (", newlines kept" if self.keep_newlines else "")

    def split(self, text: str) -> list[str]:
        sentences = []
        for start in range(0, len(text), SLICE_CHARACTERS):
            sentences.extend(self._punkt.tokenize(text[start:start + SLICE_CHARACTERS]))
        return sentences
