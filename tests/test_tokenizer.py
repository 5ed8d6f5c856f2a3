"""Tokenizer tests: token ids must equal llama.cpp's.

The reference files (tests/data/*.llamacpp.json) were produced by llama.cpp
itself. Tests that need a model file skip, saying so, when it is absent.
Speed is not asserted here; tools/bench_tokenizer.py measures it.

Run: python3 -m unittest tests.test_tokenizer -v
"""
import json
import os
import random
import sys
import tracemalloc
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import picolm  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf",
                "smollm2-135m-instruct-q4_1.llamacpp.json"),
    "gemma3": ("gemma-3-270m-q4_k_m.gguf",
               "gemma-3-270m-q4_k_m.llamacpp.json"),
}


def load_reference(name):
    with open(os.path.join(DATA, MODELS[name][1]), encoding="utf-8") as f:
        return json.load(f)


REFERENCES = {name: load_reference(name) for name in MODELS}


def read_text(filename):
    with open(os.path.join(DATA, filename), encoding="utf-8") as f:
        return f.read()


# --- the real vocabularies ----------------------------------------------------
class _ModelTokenizerTests:
    """Tests run once per model; a subclass sets NAME.

    The model's metadata and tokenizer are loaded once per class; the whole
    class skips, saying so, when the model file is absent.
    """
    NAME = None
    CONTROL = None  # (markup, (chat start id, chat end id))

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        filename = MODELS[cls.NAME][0]
        path = os.path.join(ROOT, "models", filename)
        if not os.path.exists(path):
            raise unittest.SkipTest(
                "model file models/%s is absent (CI fetches it)" % filename)
        cls.reference = REFERENCES[cls.NAME]
        with picolm.GGUFFile(path) as gguf:
            cls.metadata = gguf.metadata
        cls.tok = picolm.Tokenizer.from_metadata(cls.metadata)

    # token ids against llama.cpp
    def test_add_bos_and_vocab_size_match_llamacpp(self):
        self.assertEqual(self.tok.add_bos, self.reference["add_bos"])
        self.assertEqual(self.tok.n_vocab, self.reference["n_vocab"])

    def test_tokenize_special_as_text(self):
        for i, entry in enumerate(self.reference["tokenize"]):
            with self.subTest(case=i, text=entry["text"]):
                self.assertEqual(
                    self.tok.encode(entry["text"], add_bos=False,
                                    special=False),
                    entry["ids"])

    def test_tokenize_special_recognised(self):
        for i, entry in enumerate(self.reference["tokenize"]):
            with self.subTest(case=i, text=entry["text"]):
                self.assertEqual(self.tok.encode(entry["text"], add_bos=False),
                                 entry["ids_special"])

    def test_prompt_ids_with_default_bos(self):
        for i, entry in enumerate(self.reference["greedy"]):
            with self.subTest(case=i, prompt=entry["prompt"]):
                self.assertEqual(self.tok.encode(entry["prompt"]),
                                 entry["prompt_ids"])

    def test_long_text_first_512_tokens(self):
        # The perplexity reference: ppl-text.txt tokenized (BOS first when the
        # vocabulary adds it), first 512 ids.
        ppl = self.reference["ppl"]
        ids = self.tok.encode(read_text(ppl["file"]))
        self.assertEqual(ids[:ppl["n_tokens"]], ppl["ids"])

    # decoding
    def test_generated_ids_decode_to_llamacpp_text(self):
        for i, entry in enumerate(self.reference["greedy"]):
            with self.subTest(case=i):
                self.assertEqual(self.tok.decode(entry["gen_ids"]),
                                 entry["gen_text"])

    def test_round_trip(self):
        tok = self.tok
        for i, entry in enumerate(self.reference["tokenize"]):
            text = entry["text"]
            with self.subTest(case=i, text=text):
                self.assertEqual(tok.decode(tok.encode(
                    text, add_bos=False, special=False)), text)
                self.assertEqual(tok.decode(tok.encode(
                    text, add_bos=True, special=False)), text)

    def test_round_trip_long_text(self):
        text = read_text("ppl-text.txt")
        self.assertEqual(self.tok.decode(self.tok.encode(text, special=False)),
                         text)

    def test_control_tokens_recognised_and_never_printed(self):
        tok = self.tok
        markup, (start, end) = self.CONTROL
        ids = tok.encode(markup, add_bos=True)
        self.assertEqual(ids[0], tok.bos_id)
        self.assertEqual(ids[1], start)
        self.assertEqual(ids[-1], end)
        self.assertEqual(tok.decode(ids), "user\nHi")
        for token_id in (tok.bos_id, tok.eos_id, start, end):
            with self.subTest(token_id=token_id):
                self.assertEqual(tok.token_bytes(token_id), b"")
        stream = tok.stream()
        self.assertEqual(
            "".join(stream.feed(t) for t in ids) + stream.flush(), "user\nHi")
        # As plain text the markup is tokenized character by character.
        plain = tok.encode(markup, add_bos=False, special=False)
        self.assertNotIn(start, plain)
        self.assertNotIn(end, plain)
        self.assertEqual(tok.decode(plain), markup)

    # streaming
    def test_stream_emits_only_whole_characters(self):
        tok = self.tok
        split_seen = 0
        for i, entry in enumerate(self.reference["tokenize"]):
            text = entry["text"]
            with self.subTest(case=i, text=text):
                ids = tok.encode(text, add_bos=False, special=False)
                stream = tok.stream()
                shown, consumed = "", b""
                for token_id in ids:
                    piece = stream.feed(token_id)
                    self.assertNotIn("\ufffd", piece)
                    shown += piece
                    consumed += tok.token_bytes(token_id)
                    self.assertEqual(shown, _complete_prefix(consumed))
                    if len(shown.encode("utf-8")) < len(consumed):
                        split_seen += 1  # a character awaits its next byte
                self.assertEqual(shown + stream.flush(), text)
        # The references (emoji, CJK) must have exercised split characters.
        self.assertGreater(split_seen, 0)

    def test_stream_handles_invalid_and_truncated_bytes(self):
        tok = self.tok
        # A token for each single byte needed (0xE4 0xBD 0xA0 is "你").
        wanted = {bytes((b,)) for b in (0xE4, 0xBD, 0xA0, 0x41)}
        byte_id = {}
        for i in range(tok.n_vocab):
            piece = tok.token_bytes(i)
            if piece in wanted and piece[0] not in byte_id:
                byte_id[piece[0]] = i
        self.assertEqual(len(byte_id), len(wanted))
        stream = tok.stream()
        self.assertEqual(stream.feed(byte_id[0xE4]), "")
        self.assertEqual(stream.feed(byte_id[0xBD]), "")
        self.assertEqual(stream.feed(byte_id[0xA0]), "\u4f60")
        # a stray continuation byte
        self.assertEqual(stream.feed(byte_id[0xA0]), "\ufffd")
        self.assertEqual(stream.feed(byte_id[0xE4]), "")
        self.assertEqual(stream.feed(byte_id[0x41]), "\ufffdA")  # broken
        self.assertEqual(stream.feed(byte_id[0xE4]), "")
        self.assertEqual(stream.flush(), "\ufffd")  # truncated at the end
        self.assertEqual(stream.flush(), "")

    # special ids
    def test_all_token_bytes_equal_token_bytes(self):
        tok = self.tok
        self.assertEqual(tok.all_token_bytes(),
                         [tok.token_bytes(i) for i in range(tok.n_vocab)])

    def test_add_bos_and_add_eos_overrides(self):
        tok = self.tok
        plain = tok.encode("Hello", add_bos=False)
        self.assertEqual(tok.encode("Hello", add_bos=True),
                         [tok.bos_id] + plain)
        self.assertEqual(tok.encode("Hello", add_bos=False, add_eos=True),
                         plain + [tok.eos_id])
        self.assertEqual(tok.encode("", add_bos=False), [])
        self.assertEqual(tok.encode(""),
                         [tok.bos_id] if tok.add_bos else [])


def _complete_prefix(data):
    """The longest prefix of `data` that is whole UTF-8 characters."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("invalid UTF-8 in %r" % data)


class SmolLM2TokenizerTests(_ModelTokenizerTests, unittest.TestCase):
    NAME = "smollm2"
    CONTROL = ("<|im_start|>user\nHi<|im_end|>", (1, 2))

    def test_end_of_generation_ids(self):
        smol = self.tok
        # <|endoftext|>, <|im_end|> (EOS), and <reponame>, which llama.cpp
        # takes as the fill-in-the-middle repo token, an end-of-generation
        # token.
        self.assertEqual((smol.bos_id, smol.eos_id), (1, 2))
        self.assertEqual(smol.eog_ids, {0, 2, 4})

    def test_smollm2_tokenizer_memory(self):
        # Allocations, counted by tracemalloc: deterministic, not timed.
        tracemalloc.start()
        try:
            tok = picolm.Tokenizer.from_metadata(self.metadata)
            tok.encode("warm up: Hello world 123")
            size, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Measured ~6.5 MB (two 49k-entry dicts keyed by the metadata's bytes);
        # the whole engine must stay under 40 MB RssAnon, so keep the tokenizer
        # well below that.
        self.assertLess(size, 10 * 2 ** 20,
                        "tokenizer holds %.1f MB" % (size / 2 ** 20))


class Gemma3TokenizerTests(_ModelTokenizerTests, unittest.TestCase):
    NAME = "gemma3"
    CONTROL = ("<start_of_turn>user\nHi<end_of_turn>", (105, 106))

    def test_end_of_generation_ids(self):
        gemma = self.tok
        # <eos>, <end_of_turn>, and </s> (llama.cpp lists it for paddleocr).
        self.assertEqual((gemma.bos_id, gemma.eos_id), (2, 1))
        self.assertEqual(gemma.eog_ids, {1, 106, 212})

    def test_gemma_user_defined_tokens_match_without_special(self):
        tok = self.tok
        ids = tok.encode("a  b\n\nc", add_bos=False, special=False)
        self.assertEqual(tok.token_text(ids[1]), "  ")
        self.assertEqual(tok.token_type(ids[1]), 4)
        self.assertEqual(tok.token_text(ids[3]), "\n\n")
        self.assertEqual(tok.decode(ids), "a  b\n\nc")


# --- small synthetic vocabularies -------------------------------------------
def _gpt2_chars():
    printable = (list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def utf8(texts):
    """Strings as GGUFFile reads arrays of them: the file's UTF-8 bytes."""
    return [t.encode("utf-8") for t in texts]


def gpt2_metadata(pre="gpt2", merges=("h e", "l l", "he ll", "Ġ w"),
                  extra=("he", "ll", "hell", "Ġw"), **more):
    tokens = ["<|endoftext|>"] + _gpt2_chars() + list(extra)
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": utf8(tokens),
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": utf8(merges),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    metadata.update(more)
    return metadata


def spm_metadata(add_space_prefix=True):
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "h", "i", "\u2581h",
              "\u2581hi", "hi", "<0x41>", "<0xC3>", "<0xA9>"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6, 6]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -1.5, -4.0, 0, 0, 0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": utf8(tokens),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


class SyntheticVocabularyTests(unittest.TestCase):
    def test_bpe_merges_follow_rank_order(self):
        tok = picolm.Tokenizer.from_metadata(gpt2_metadata())
        ids = tok.encode("hello world", add_bos=False)
        self.assertEqual([tok.token_text(i) for i in ids],
                         ["hell", "o", "Ġw", "o", "r", "l", "d"])
        self.assertEqual(tok.decode(ids), "hello world")
        # gpt2 vocabularies default to no BOS
        self.assertIs(tok.add_bos, False)

    def test_bpe_llama3_defaults_and_pretokenizer(self):
        tok = picolm.Tokenizer.from_metadata(gpt2_metadata(pre="llama-bpe"))
        # llama.cpp's default for llama3 vocabularies
        self.assertIs(tok.add_bos, True)
        no_bos = picolm.Tokenizer.from_metadata(
            gpt2_metadata(pre="llama-bpe",
                          **{"tokenizer.ggml.add_bos_token": False}))
        self.assertIs(no_bos.add_bos, False)  # the file's flag wins

    def test_unknown_pretokenizer_warns_and_uses_default(self):
        warnings = []
        tok = picolm.Tokenizer.from_metadata(
            gpt2_metadata(pre="no-such-pre"), warn=warnings.append)
        self.assertEqual(len(warnings), 1)
        self.assertIn("no-such-pre", warnings[0])
        self.assertEqual(tok.decode(tok.encode("hello 1234")), "hello 1234")

    def test_spm_space_prefix_scores_and_byte_fallback(self):
        tok = picolm.Tokenizer.from_metadata(spm_metadata())
        self.assertIs(tok.add_bos, True)
        self.assertEqual(tok.bos_id, 1)
        self.assertEqual(tok.eos_id, 2)
        ids = tok.encode("hi hiA\u00e9", add_bos=False)
        # "▁hi" outscores "hi"; A and é have no token -> <0x..> byte tokens.
        self.assertEqual([tok.token_text(i) for i in ids],
                         ["\u2581hi", "\u2581hi", "<0x41>", "<0xC3>",
                          "<0xA9>"])
        self.assertEqual(tok.decode(ids), "hi hiA\u00e9")
        self.assertEqual(tok.decode(tok.encode("hi")), "hi")  # BOS + "▁hi"
        no_prefix = picolm.Tokenizer.from_metadata(spm_metadata(False))
        self.assertEqual([no_prefix.token_text(i) for i in no_prefix.encode(
            "hi", add_bos=False)], ["hi"])
        # Bytes with no <0xNN> token become the unknown token (not printed).
        self.assertEqual(no_prefix.encode("\u0100", add_bos=False), [0, 0])
        self.assertEqual(no_prefix.token_bytes(0), b"")

    def test_all_token_bytes_equal_token_bytes(self):
        # every stand-in, a token mixing them, a control token, and a normal token
        # holding characters that are no stand-ins (the token-by-token path)
        for odd in ((), ("a b\u20ac",)):
            tok = picolm.Tokenizer.from_metadata(
                gpt2_metadata(extra=("he", "ll", "hell", "Ġw", "ĠĀłń") + odd))
            every = tok.all_token_bytes()
            self.assertEqual(every, [tok.token_bytes(i) for i in range(tok.n_vocab)])
            self.assertEqual(every[0], b"")
            self.assertEqual(sorted(every[1:257]), [bytes((b,)) for b in range(256)])
        self.assertEqual(every[-1], b"a b\xe2\x82\xac")
        tok = picolm.Tokenizer.from_metadata(spm_metadata())
        self.assertEqual(tok.all_token_bytes(),
                         [tok.token_bytes(i) for i in range(tok.n_vocab)])

    def test_bad_metadata_raises_value_error(self):
        cases = [
            ({"tokenizer.ggml.token_type": [1, 1]}, "token_type"),
            ({"tokenizer.ggml.tokens": None}, "tokens"),
            ({"tokenizer.ggml.model": None}, "model"),
            ({"tokenizer.ggml.model": "bert"}, "unsupported"),
            ({"tokenizer.ggml.merges": None}, "merges"),
            ({"tokenizer.ggml.tokens": [b"a", b"a"],
              "tokenizer.ggml.token_type": [1, 1]}, "duplicate"),
        ]
        for change, message in cases:
            with self.subTest(change=change, message=message):
                metadata = gpt2_metadata()
                for key, value in change.items():
                    if value is None:
                        del metadata[key]
                    else:
                        metadata[key] = value
                with self.assertRaisesRegex(ValueError, message):
                    picolm.Tokenizer.from_metadata(metadata,
                                                   warn=lambda m: None)

    def test_add_bos_without_bos_token_raises(self):
        metadata = {"tokenizer.ggml.model": "llama",
                    "tokenizer.ggml.tokens": [b"<unk>"],
                    "tokenizer.ggml.token_type": [2],
                    "tokenizer.ggml.scores": [0.0]}
        with self.assertRaisesRegex(ValueError, "BOS"):
            picolm.Tokenizer.from_metadata(metadata)

    def test_token_id_outside_vocabulary_raises(self):
        tok = picolm.Tokenizer.from_metadata(gpt2_metadata())
        for bad in (-1, tok.n_vocab):
            with self.subTest(token_id=bad):
                with self.assertRaises(ValueError):
                    tok.token_bytes(bad)

    def test_spm_scores_length_checked(self):
        metadata = spm_metadata()
        metadata["tokenizer.ggml.scores"] = [0.0]
        with self.assertRaisesRegex(ValueError, "scores"):
            picolm.Tokenizer.from_metadata(metadata)


# --- pre-tokenizer ------------------------------------------------------------
class PretokenizerTests(unittest.TestCase):
    def test_pretokenizer_splits(self):
        cases = [
            ("gpt2", "Hello world's 12345  x\n",
             ["Hello", " world", "'s", " 12345", " ", " x", "\n"]),
            ("smollm", "x 3.14  ", ["x", " ", "3", ".", "1", "4", "  "]),
            ("llama3", "I'LL pay 12345!\n\n",
             ["I", "'LL", " pay", " ", "123", "45", "!\n\n"]),
            ("qwen2", "ab 123", ["ab", " ", "1", "2", "3"]),
            # default: punctuation runs, GPT-2, digit runs, then 3-digit
            # groups.
            ("default", "a+b 1234", ["a", "+", "b", " ", "123", "4"]),
            ("gpt2", "caf\u00e9 \u4f60\u597d\u00a0\u0663",
             ["caf\u00e9", " \u4f60\u597d", "\u00a0", "\u0663"]),
        ]
        for kind, text, pieces in cases:
            with self.subTest(kind=kind, text=text):
                self.assertEqual(
                    picolm._pretokenize(picolm._pre_regexes(kind), text),
                    pieces)

    def test_pretokenizer_matches_unicode_classes(self):
        # Cross-check the unicodedata-based classes against real \p{L}/\p{N}.
        try:
            import regex
        except ImportError:
            self.skipTest("the third-party `regex` module is not installed "
                          "(needed for the \\p{L}/\\p{N} cross-check)")
        gpt2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
                r"| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
        patterns = {
            "smollm": [r"\p{N}", gpt2],
            "llama3": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]"
                       r"|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
            "default": [r"[\p{P}\$\+<=>\^~\|]+", gpt2, r"\p{N}+",
                        r"[0-9][0-9][0-9]"],
        }

        def reference_split(regexes, text):
            pieces = [text]
            for pattern in regexes:
                compiled, split = regex.compile(pattern), []
                for piece in pieces:
                    pos = 0
                    for m in compiled.finditer(piece):
                        if m.start() > pos:
                            split.append(piece[pos:m.start()])
                        split.append(m.group())
                        pos = m.end()
                    if pos < len(piece):
                        split.append(piece[pos:])
                pieces = split
            return pieces

        alphabet = (list("aZ09 '\t\n\r\x0b\x1c.,!?$+<=>^~|`-_sStTlLdD")
                    + ["\xa0", "\u3000", "\x85", "\u00e9", "\u0301",
                       "\u4e2d", "\u0663", "\u216b", "\u00bd", "\u20ac",
                       "\u200b", "\U0001F999"])
        rng = random.Random(7)
        for kind, regexes in patterns.items():
            mine = picolm._pre_regexes(kind)
            for _ in range(3000):
                text = "".join(rng.choice(alphabet)
                               for _ in range(rng.randint(1, 12)))
                self.assertEqual(picolm._pretokenize(mine, text),
                                 reference_split(regexes, text),
                                 (kind, text))


if __name__ == "__main__":
    unittest.main()
