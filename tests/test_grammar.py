"""JSON grammar tests (--json, --json-schema): the byte-level matcher, its
shortest completions, the schema subset and the token mask.

Tests that need the SmolLM2 model file skip when it is absent (CI fetches it).
PICOLM_FUZZ=N multiplies the number of random runs (default 1).
"""
import collections
import json
import os
import random
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FUZZ = int(os.environ.get("PICOLM_FUZZ", "1"))
SMOLLM2 = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


import picolm as G  # noqa: E402  (after the path is set)
START = G.json_start()


def advance(data, state=START):
    return G.json_advance(state, data)


def reject_index(data, state=START):
    """Index of the first byte the grammar refuses, or None."""
    for i in range(len(data)):
        state = G.json_advance(state, data[i:i + 1])
        if state is None:
            return i
    return None


# ----------------------------------------------------------------------------
# An independent validator for the schema subset (standard JSON Schema meaning)

def json_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(json_equal(a[k], b[k]) for k in a)
    return type(a) == type(b) and a == b


def type_of(value):
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"integer", "number"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    if isinstance(value, list):
        return {"array"}
    return {"object"}


def validate(schema, value):
    if schema is True or schema == {}:
        return True
    if schema is False:
        return False
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not type_of(value) & set(names):
            return False
    if "enum" in schema and not any(json_equal(value, v) for v in schema["enum"]):
        return False
    if "const" in schema and not json_equal(value, schema["const"]):
        return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return False
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return False
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return False
        if not all(validate(schema.get("items", True), v) for v in value):
            return False
    if isinstance(value, dict):
        if not all(name in value for name in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        for k, v in value.items():
            sub = props[k] if k in props else schema.get("additionalProperties", True)
            if not validate(sub, v):
                return False
    return True


def validate_top(schema, value):
    if schema is None:
        return isinstance(value, dict)
    if not any(k in schema for k in ("type", "enum", "const")) and not isinstance(value, dict):
        return False
    return validate(schema, value)


# ----------------------------------------------------------------------------
# Documents

VALID = [
    b'{}', b'{ }', b'{"a":1}', b'{"a":-0}', b'{"a":0.5e+10,"b":-12.25E-3,"c":1E5}',
    b'{"":""}', b'{"a":[],"b":{},"c":[{}],"d":[[[]]]}',
    b'{"s":"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u00E9\\uD83D\\uDE00\\u0000"}',
    '{"u":"é€😀 \x7f"}'.encode("utf-8"),
    b'{"t":true,"f":false,"n":null,"l":[true,false,null,1,"x"]}',
    b'{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}',
    b'{\t"a"\t:\t1\t}', b' \n{"a" :1 , "b": 2}',
    b'{"a":1,"a":2}',
]

INVALID = [   # (document, index of the byte refused)
    (b'{abc}', 1), (b'{"a" 1,}', 5), (b'{"a":1,}', 7), (b'{"a":1}}', 7),
    (b'{"a":01}', 6), (b'{"a":-}', 6), (b'{"a":1.}', 7), (b'{"a":1e}', 7),
    (b'{"a":1e+}', 8), (b'{"a":.5}', 5), (b'{"a":+1}', 5), (b'{"a":-01}', 7),
    (b'{"a":"\\x"}', 7), (b'{"a":"\\u12g4"}', 10), (b'{"a":"\n"}', 6),
    (b'{"a":"\x01"}', 6), (b'{"a":"\\udc00"}', 9), (b'{"a":"\\uDFFF"}', 9),
    (b'{"a":"\\ud800x"}', 12), (b'{"a":"\\ud800\\u0041"}', 14),
    (b'{"a":"\\ud800\\ud800"}', 15),
    (b'{"a":"\xc3("}', 7), (b'{"a":"\xc0\x80"}', 6), (b'{"a":"\xed\xa0\x80"}', 7),
    (b'{"a":"\xf5\x80\x80\x80"}', 6), (b'{"a":"\xe0\x80\x80"}', 7),
    (b'{"a":"\xf4\x90\x80\x80"}', 7), (b'{"a":"\x80"}', 6),
    (b'{"a":tru}', 8), (b'{"a":nul }', 8), (b'{"a":True}', 5),
    (b'{},', 2), (b'{} ', 2), (b'{}\n', 2), (b'{}{}', 2), (b'{"a":1,,', 7),
    (b'{"a"::1}', 5), (b'[1]', 0), (b'"x"', 0), (b'1', 0), (b'{"a":[1,]}', 8),
    (b'{"a":[,1]}', 6), (b'{,}', 1), (b'{"a":1 "b":2}', 7), (b'{\n\n"a":1}', 2),
    (b'{' + b' ' * 33, 33), (b'\r{}', 0), (b'{"a":1\r}', 6), (b"{'a':1}", 1),
    (b'{"a":[1 2]}', 8), (b'{"a":1}"}.', 7), (b'{"a":{"b":1}},', 13),
]


def random_string(rng):
    pool = 'abcXYZ 09"\\/\n\t\x01\x1f\x7féß€😀\u2028'
    return "".join(rng.choice(pool) for _ in range(rng.randrange(8)))


def random_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randrange(-10 ** rng.randrange(12), 10 ** rng.randrange(12))
    if kind == 2:
        return rng.choice([0.5, -1e-7, 3.25e22, 1.0, -0.0, 123.456, 1e300])
    if kind in (3, 4):
        return random_string(rng)
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_object(rng, depth + 1)


def random_object(rng, depth=0):
    return {random_string(rng): random_value(rng, depth)
            for _ in range(rng.randrange(4))}


def random_document(rng):
    value = random_object(rng)
    style = rng.randrange(4)
    ascii_only = rng.random() < 0.5
    if style == 0:
        text = json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))
    elif style == 1:
        text = json.dumps(value, ensure_ascii=ascii_only)
    elif style == 2:
        text = json.dumps(value, ensure_ascii=ascii_only, indent=2)
    else:
        text = json.dumps(value, ensure_ascii=ascii_only, indent="\t")
    return text.encode("utf-8")


def chunks(data, rng):
    i = 0
    while i < len(data):
        n = rng.randrange(1, 8)
        yield data[i:i + n]
        i += n


# ----------------------------------------------------------------------------

class GrammarTest(unittest.TestCase):

    def check_accepts(self, doc, state=START):
        s = state
        for i in range(len(doc)):
            s = G.json_advance(s, doc[i:i + 1])
            self.assertIsNotNone(s, "%r refused at byte %d" % (doc, i))
        self.assertTrue(G.json_is_complete(s), doc)
        return s

    def test_valid_documents_byte_by_byte(self):
        for doc in VALID:
            s = self.check_accepts(doc)
            self.assertTrue(G.json_is_done(s))
            self.assertEqual(G.json_completion(s), b"")

    def test_random_documents_in_random_chunks(self):
        rng = random.Random(1)
        for _ in range(300):
            doc = random_document(rng)
            json.loads(doc)
            self.check_accepts(doc)
            s = START
            for piece in chunks(doc, rng):
                s = G.json_advance(s, piece)
                self.assertIsNotNone(s, doc)
            self.assertTrue(G.json_is_done(s), doc)

    def test_invalid_documents_refused_at_the_right_byte(self):
        for doc, index in INVALID:
            self.assertEqual(reject_index(doc), index, doc)
            self.assertIsNone(G.json_advance(START, doc), doc)

    def test_whitespace_rule(self):
        self.assertIsNotNone(advance(b"{" + b" " * 32 + b"}"))
        self.assertIsNotNone(advance(b'{\n' + b"\t" * 32 + b'"a"\n:\n1\n,\n"b" : 2\n}'))
        self.assertIsNone(advance(b"{ \n \n}"))
        self.assertIsNone(advance(b"\n\n{}"))

    def test_depth_limit(self):
        deep = b'{"a":' + b"[" * (G.JSON_MAX_DEPTH - 1)
        s = advance(deep)
        self.assertIsNotNone(s)
        self.assertIsNone(G.json_advance(s, b"["))
        self.assertIsNotNone(G.json_advance(s, b"]"))
        self.assertEqual(json.loads(deep + G.json_completion(s)),
                         json.loads(deep + b"]" * (G.JSON_MAX_DEPTH - 1) + b"}"))

    def test_states_are_shared_not_mutated(self):
        s = advance(b'{"a":[1,"x')
        before = G.json_completion(s)
        for token in (b'y"]}', b'\\n', b'"', b'\xc3', b"}"):
            G.json_advance(s, token)
        self.assertEqual(G.json_completion(s), before)

    def test_top_level_number_is_complete_but_may_go_on(self):
        g = G.JsonGrammar({"type": "number"})
        s = g.advance(g.start, b"12")
        self.assertTrue(g.is_complete(s))
        self.assertFalse(g.is_done(s))
        self.assertIsNotNone(g.advance(s, b".5"))
        self.assertIsNone(g.advance(s, b" "))
        self.assertIsNone(g.advance(s, b","))


# ----------------------------------------------------------------------------

SCHEMAS = [
    None,
    {"type": "object",
     "properties": {"name": {"type": "string", "maxLength": 8, "minLength": 1},
                    "age": {"type": "integer"},
                    "tags": {"type": "array", "maxItems": 3,
                             "items": {"type": "string", "enum": ["a", "b c", "é"]}},
                    "ok": {"type": "boolean"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"properties": {"a": {"type": "string", "minLength": 2},
                    "ab": {"const": {"x": [1, 2]}}},
     "required": ["ab"], "title": "tracked keys"},
    {"type": "array", "items": {"type": ["number", "null"]}, "minItems": 2, "maxItems": 4},
    {"type": ["string", "integer"], "minLength": 3, "maxLength": 5},
    {"enum": [1, 12, "x", None, {"k": "v"}, [True], 1.5]},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "object",
     "properties": {"q\"uote": {"type": "null"}, "ünï": {"type": "boolean"},
                    "a\\b": {"type": "string", "maxLength": 1}},
     "required": ["q\"uote", "ünï"]},
    {"type": "number"},
    {"type": "object", "properties": {"x": False, "y": {"type": "integer"}}},
    {"type": "object",
     "properties": {"p": {"type": "object",
                          "properties": {"q": {"type": "array", "minItems": 2,
                                               "items": {"type": "string",
                                                         "minLength": 1}}},
                          "required": ["q"]}},
     "required": ["p"], "additionalProperties": False},
    {"type": "string", "maxLength": 0},
    {"required": ["_", ""], "properties": {"__": {"type": "string"}, "b": {}}},
    {"type": ["boolean", "null", "object"], "required": ["z"],
     "additionalProperties": False, "properties": {"z": {"enum": ["u", "v"]}}},
    {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    {"type": "array", "items": {"type": "array", "items": {"type": "string",
                                                             "maxLength": 2}}},
]


def synthetic_vocab(rng):
    """Every single byte, structural fragments and pieces of random documents."""
    vocab = [b""] + [bytes((b,)) for b in range(256)]
    vocab += [b'{"', b'":', b'",', b'"}', b'},', b'}}', b']}', b'[{', b' "', b'"]',
              b'true', b'false', b'null', b'name', b'age', b'12', b'3.5', b'e+', b'-0',
              b'\\u00', b'\\ud83d', b'\\ude00', "é".encode(), "€".encode(), b'\xe2\x82',
              b'\\n', b'  ', b'\n  ', b'\n', b' ', b'", "', b'": "', b'": ', b'tags',
              b'"name', b'"age":', b'"a', b'"ab":', b'ok', b' {"', b'"}.', b'null,',
              b'x', b'"x"', b'q\\"', b'\xc3\xbcn', b'\xc3', b'\xbc', b'""', b'[]', b'{}']
    for _ in range(600):
        doc = random_document(rng)
        i = rng.randrange(len(doc))
        vocab.append(doc[i:i + rng.randrange(1, 7)])
    return vocab


_SYNTHETIC = None


def synthetic():
    global _SYNTHETIC
    if _SYNTHETIC is None:
        vocab = synthetic_vocab(random.Random(7))
        _SYNTHETIC = (vocab, G.JsonTokenIndex(vocab))
    return _SYNTHETIC


def brute_mask(vocab, state, budget):
    out = []
    for i, t in enumerate(vocab):
        if t:
            after = G.json_advance(state, t)
            if after is not None and (budget is None
                                      or G.json_completion_length(after) <= budget):
                out.append(i)
    return sorted(out)


def engine_walk(grammar, index, rng, n_tokens, states=None):
    """What the engine does, given n_tokens more than the fewest the schema
    needs: with n tokens left, allow a token only if its state's
    completion fits the n - 1 after it; stop when done (or at random once
    complete, as an end-of-generation token would). Returns the bytes."""
    s = grammar.start
    out = []
    n_tokens += G.json_completion_length(s)
    while not G.json_is_done(s):
        if G.json_is_complete(s) and (n_tokens == 0 or rng.random() < 0.2):
            break                   # end of generation
        assert n_tokens > 0, "budget ran out on an unfinished value: %r" % b"".join(out)
        allowed = index.allowed_tokens(s, n_tokens - 1)
        if not allowed and G.json_is_complete(s):
            break                   # a number that cannot go on within the budget
        assert allowed, "no allowed token after %r" % b"".join(out)
        token = rng.choice(allowed)
        after = index.try_token(s, token, n_tokens - 1)
        assert after is not None
        if states is not None:
            states.append((s, n_tokens - 1, b"".join(out)))
        out.append(index.token_bytes[token])
        s = after
        n_tokens -= 1
    return b"".join(out)


class CompletionTest(unittest.TestCase):

    def check_completion(self, state, schema, prefix):
        c = G.json_completion(state)
        self.assertEqual(len(c), G.json_completion_length(state), prefix)
        end = G.json_advance(state, c)
        self.assertIsNotNone(end, (prefix, c))
        self.assertTrue(G.json_is_complete(end), (prefix, c))
        value = json.loads(prefix + c)
        self.assertTrue(validate_top(schema, value), (prefix, c))
        if c:
            # the engine relies on this: the first byte of the completion leaves a
            # state whose completion is exactly one byte shorter
            nxt = G.json_advance(state, c[:1])
            self.assertEqual(G.json_completion_length(nxt), len(c) - 1, (prefix, c))
        return c

    def test_completions_of_prefixes_of_valid_documents(self):
        rng = random.Random(2)
        docs = VALID + [random_document(rng) for _ in range(150)]
        for doc in docs:
            for cut in sorted(set(rng.randrange(len(doc) + 1) for _ in range(12))):
                s = advance(doc[:cut])
                self.check_completion(s, None, doc[:cut])

    def test_shortest_examples(self):
        cases = [(b"", b"{}"), (b"{", b"}"), (b'{"a', b'":0}'), (b'{"a":', b"0}"),
                 (b'{"a":[1,', b"0]}"), (b'{"a":"\\ud8', b'00\\udc00"}'),
                 (b'{"a":-', b"0}"), (b'{"a":1.', b"0}"), (b'{"a":tr', b"ue}"),
                 (b'{"a":"\xf0\x9f', b'\x80\x80"}'), (b'{"a":"\\', b'\\"}'),
                 (b'{"a":{"b":[', b"]}}"), (b'{"a":1,', b'"":0}')]
        for prefix, expected in cases:
            self.assertEqual(G.json_completion(advance(prefix)), expected, prefix)
        g = G.JsonGrammar(SCHEMAS[1])
        self.assertEqual(g.completion(g.start), b'{"name":"a","age":0}')
        s = g.advance(g.start, b'{"age":1,"n')
        self.assertEqual(g.completion(s), b'ame":"a"}')

    def test_completions_are_shortest(self):
        """Breadth-first search over a byte alphabet finds nothing shorter."""
        alphabet = sorted(set(b'{}[]",:0123456789.-+eE_abtrufelsnxzq\\/dcDC \x80\x90\xa0\xbf'
                              + "é".encode()))
        rng = random.Random(3)
        index = synthetic()[1]
        checked = 0
        for schema in SCHEMAS:
            g = G.JsonGrammar(schema)
            for _ in range(2 * FUZZ):
                states = []
                engine_walk(g, index, rng, rng.randrange(2, 30), states)
                for s, _, _ in states:
                    n = G.json_completion_length(s)
                    if n > 4 or G.json_is_complete(s):
                        continue
                    frontier = {s}
                    for _depth in range(n - 1):
                        frontier = {a for f in frontier for b in alphabet
                                    for a in [G.json_advance(f, bytes((b,)))] if a is not None}
                        self.assertFalse(any(G.json_is_complete(f) for f in frontier),
                                         (schema, s))
                    checked += 1
        self.assertGreater(checked, 20)

    def test_schema_completions_of_random_walks(self):
        rng = random.Random(4)
        index = synthetic()[1]
        for schema in SCHEMAS:
            g = G.JsonGrammar(schema)
            for _ in range(8 * FUZZ):
                states = []
                engine_walk(g, index, rng, rng.randrange(40), states)
                for s, _, prefix in states:
                    self.assertEqual(g.advance(g.start, prefix), s)
                    self.check_completion(s, schema, prefix)

    def test_engine_simulation_always_valid(self):
        """Random tokens under every budget: the output always parses and fits."""
        rng = random.Random(5)
        index = synthetic()[1]
        counts = collections.Counter()
        for schema in SCHEMAS:
            g = G.JsonGrammar(schema)
            for n in list(range(4)) + [rng.randrange(120) for _ in range(12 * FUZZ)]:
                out = engine_walk(g, index, rng, n)
                value = json.loads(out)
                self.assertTrue(validate_top(schema, value), (schema, out))
                s = g.advance(g.start, out)
                self.assertTrue(g.is_complete(s))
                counts[schema is None] += 1
                # every prefix completes to a valid document too
                cut = rng.randrange(len(out) + 1)
                p = g.advance(g.start, out[:cut])
                self.check_completion(p, schema, out[:cut])
        self.assertGreater(sum(counts.values()), 200)


# ----------------------------------------------------------------------------

def deep_schema(n):
    schema = {"type": "integer"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


class SchemaTest(unittest.TestCase):

    def test_unsupported_keywords_are_named(self):
        for schema, word in [({"type": "string", "pattern": "a+"}, "pattern"),
                             ({"properties": {"a": {"minimum": 1}}}, "minimum"),
                             ({"items": {"format": "date"}, "type": "array"}, "format"),
                             ({"$ref": "#/$defs/x"}, "$ref"),
                             ({"anyOf": [{"type": "string"}]}, "anyOf"),
                             ({"type": "object", "patternProperties": {}},
                              "patternProperties"),
                             ({"additionalProperties": {"oneOf": []}}, "oneOf"),
                             ({"prefixItems": []}, "prefixItems")]:
            with self.assertRaises(G.JsonSchemaError) as cm:
                G.JsonGrammar(schema)
            self.assertIn(repr(word), str(cm.exception))
            self.assertIsInstance(cm.exception, ValueError)

    def test_malformed_and_empty_schemas(self):
        for schema in [{"type": "str"}, {"type": 3}, {"minLength": -1}, {"maxItems": "2"},
                       {"required": "a"}, {"required": ["a", "a"]}, {"properties": []},
                       {"items": [{}]}, {"additionalProperties": 1}, [], "x",
                       {"type": "string", "minLength": 3, "maxLength": 2}, False,
                       {"enum": []}, {"type": "integer", "enum": ["a", 1.5]},
                       {"enum": [float("nan")]},
                       {"required": ["a"], "additionalProperties": False},
                       {"type": "object", "required": ["x"], "properties": {"x": False}},
                       {"type": "array", "minItems": 1, "items": False}, deep_schema(70)]:
            with self.assertRaises(G.JsonSchemaError, msg=repr(schema)):
                G.JsonGrammar(schema)

    def test_annotations_are_ignored(self):
        g = G.JsonGrammar({"title": "t", "description": "d", "$schema": "x", "$id": "y",
                           "examples": [1], "default": {}, "$comment": "c",
                           "properties": {"a": {"description": "z", "type": "integer"}}})
        self.assertIsNotNone(g.advance(g.start, b'{"a":1}'))
        self.assertIsNone(g.advance(g.start, b'{"a":"'))

    def test_property_names_and_required(self):
        g = G.JsonGrammar(SCHEMAS[1])
        self.assertIsNotNone(g.advance(g.start, b'{"na'))
        self.assertEqual(reject_index(b'{"nb', g.start), 3)
        self.assertEqual(reject_index(b'{"name":"x"}', g.start), 11)     # age missing
        self.assertEqual(reject_index(b'{"age":1,"age', g.start), 10)    # no duplicates
        self.assertEqual(reject_index(b'{"age":1.5', g.start), 8)        # integer
        self.assertEqual(reject_index(b'{"age":1e3', g.start), 8)
        self.assertEqual(reject_index(b'{"name":"123456789', g.start), 17)  # maxLength 8
        self.assertEqual(reject_index(b'{"name":"', g.start), None)
        self.assertEqual(reject_index(b'{"name":""', g.start), 9)        # minLength 1
        ok = (b'{"name":"\xc3\xa9\xc3\xa9\\u00e9\\ud83d\\ude00abcd","age":-3,'
              b'"tags":["b c","\xc3\xa9"]}')
        self.assertTrue(g.is_done(g.advance(g.start, ok)))
        self.assertEqual(reject_index(b'{"tags":["a","a","a",', g.start), 20)  # maxItems
        self.assertEqual(reject_index(b'{"tags":["\\u00e9"', g.start), 10)      # canonical
        self.assertEqual(reject_index(b'{"age":0,"ok":true,"name":"a","tags":[],', g.start),
                         39)    # no key left to add
        s = g.advance(g.start, b'{"age":0,"ok":true,"name":"a"')
        self.assertEqual(g.completion(s), b"}")

    def test_additional_properties_with_named_keys(self):
        g = G.JsonGrammar(SCHEMAS[2])
        s = g.advance(g.start, b'{"a":"xy","zz":[1,{}],"ab":{"x":[1,2]}')
        self.assertTrue(g.is_complete(g.advance(s, b"}")))
        self.assertIsNone(g.advance(g.start, b'{"ab":{"x":[1,2]},"ab"'))       # duplicate
        self.assertIsNone(g.advance(g.start, b'{"\\u0061b":{"x":[1,3]'))       # decoded name
        self.assertIsNone(g.advance(g.start, b'{"a":"x"'))                     # minLength
        self.assertIsNone(g.advance(g.start, b'{"a":"xy"}'))                   # ab required
        s = g.advance(g.start, b'{"ab":{"x":[1,2]},"a')
        self.assertEqual(g.completion(s), b'_":0}')

    def test_types_enum_const(self):
        g = G.JsonGrammar(SCHEMAS[5])
        for doc in (b"1", b"12", b'"x"', b"null", b'{"k":"v"}', b"[true]", b"1.5"):
            s = g.advance(g.start, doc)
            self.assertTrue(g.is_complete(s), doc)
        for doc in (b"2", b"13", b'"y"', b'{"k": "v"}', b"true", b"1.50"):
            self.assertIsNone(g.advance(g.start, doc), doc)
        g = G.JsonGrammar({"const": "é\n"})
        self.assertTrue(g.is_done(g.advance(g.start, '"é\\n"'.encode())))
        self.assertIsNone(g.advance(g.start, b'"\\u00e9'))
        g = G.JsonGrammar(SCHEMAS[4])
        self.assertIsNone(g.advance(g.start, b'"ab"'))
        self.assertIsNotNone(g.advance(g.start, b'"abc"'))
        self.assertIsNone(g.advance(g.start, b'"abcdef'))
        self.assertIsNone(g.advance(g.start, b"1.0"))
        self.assertIsNone(g.advance(g.start, b"{"))
        self.assertEqual(g.completion(g.start), b"0")
        g = G.JsonGrammar({"type": "integer", "enum": [1, 2.0, 2.5, "x"]})
        self.assertIsNotNone(g.advance(g.start, b"2.0"))
        self.assertIsNone(g.advance(g.start, b"2.5"))

    def test_forbidden_property_and_nested(self):
        g = G.JsonGrammar(SCHEMAS[9])
        self.assertIsNone(g.advance(g.start, b'{"x"'))
        self.assertIsNotNone(g.advance(g.start, b'{"xy":"q","y":1}'))
        g = G.JsonGrammar(SCHEMAS[10])
        self.assertEqual(g.completion(g.start), b'{"p":{"q":["a","a"]}}')


# ----------------------------------------------------------------------------

class MaskTest(unittest.TestCase):

    def check_masks(self, vocab, index, rng, walks):
        compared = 0
        for schema in SCHEMAS:
            g = G.JsonGrammar(schema)
            for _ in range(walks):
                states = []
                engine_walk(g, index, rng, rng.randrange(1, 60), states)
                for s, budget, _ in rng.sample(states, min(4, len(states))):
                    for b in (budget, rng.randrange(0, budget + 3), None):
                        self.assertEqual(sorted(index.allowed_tokens(s, b)),
                                         brute_mask(vocab, s, b), (schema, s, b))
                        compared += 1
        return compared

    def test_mask_equals_brute_force_synthetic(self):
        vocab, index = synthetic()
        self.assertGreater(self.check_masks(vocab, index, random.Random(6), 4 * FUZZ), 150)

    def test_mask_tight_budgets_in_keys(self):
        vocab, index = synthetic()
        vocab = vocab + [b"\xc3\xbc", b"n\xc3", "ünï".encode(), b"am", b"_", b"__"]
        index = G.JsonTokenIndex(vocab)
        for schema in (SCHEMAS[7], SCHEMAS[12], SCHEMAS[2],
                       {"properties": {"name": {"type": "array", "minItems": 3},
                                       "nam": {}, "ünï": {}}, "required": ["ünï"]}):
            g = G.JsonGrammar(schema)
            for prefix in (b'{"', b'{"n', b'{"na', b'{"nam', b'{"\xc3', b'{"\xc3\xbc',
                           b'{"_', b'{"\\u00fc', b'{"ab":{"x":[1,2]},"a', b'{"q\\'):
                s = g.advance(g.start, prefix)
                if s is None:
                    continue
                need = g.completion_length(s)
                for budget in range(need - 1, need + 12):
                    self.assertEqual(sorted(index.allowed_tokens(s, budget)),
                                     brute_mask(vocab, s, budget), (schema, prefix, budget))

    def test_mask_complement_in_strings(self):
        """mask() gives the allowed ids, or flagged as refused exactly the others: the
        complement where a string allows most of a vocabulary of words."""
        vocab, _ = synthetic()
        rng = random.Random(12)
        letters = "abcdefghijklmnopqrstuvwxyz é€"
        vocab = vocab + sorted({"".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
                                .encode() for _ in range(1500)})
        index = G.JsonTokenIndex(vocab)
        seen = collections.Counter()
        for schema, prefixes in (
                (SCHEMAS[0], (b'{"', b'{"ab', b'{"a":"', b'{"a":"x\xc3\xa9', b'{"a":"\\')),
                ({"type": "string", "minLength": 3, "maxLength": 5},
                 (b'"', b'"a', b'"abcd', b'"abcde')),
                (SCHEMAS[12], (b'{"', b'{"_', b'{"b":1,"'))):
            g = G.JsonGrammar(schema)
            for prefix in prefixes:
                s = g.advance(g.start, prefix)
                need = g.completion_length(s)
                for budget in (need - 1, need, need + 1, need + 3, need + 20, None):
                    ids, refused = index.mask(s, budget)
                    if refused:
                        ids = set(range(len(vocab))) - set(ids)
                    self.assertEqual(sorted(ids), brute_mask(vocab, s, budget),
                                     (schema, prefix, budget))
                    seen[refused] += 1
        self.assertGreater(seen[True], 20)
        self.assertGreater(seen[False], 5)

    def test_try_token_matches_mask(self):
        vocab, index = synthetic()
        s = advance(b'{"a":"x')
        allowed = set(index.allowed_tokens(s, 3))
        for i in range(len(vocab)):
            self.assertEqual(index.try_token(s, i, 3) is not None, i in allowed, vocab[i])

    @unittest.skipUnless(os.path.exists(SMOLLM2),
                         "needs models/SmolLM2-135M-Instruct.Q4_1.gguf")
    def test_mask_equals_brute_force_smollm2(self):
        with G.GGUFFile(SMOLLM2) as m:
            t = G.Tokenizer.from_metadata(m.metadata)
            vocab = [t.token_bytes(i) for i in range(t.n_vocab)]
        index = G.JsonTokenIndex(vocab)
        rng = random.Random(8)
        compared = 0
        for schema in SCHEMAS[:3] + SCHEMAS[7:8]:
            g = G.JsonGrammar(schema)
            states = []
            engine_walk(g, index, rng, 40, states)
            for s, budget, _ in rng.sample(states, min(4, len(states))):
                for b in (budget, 3):
                    self.assertEqual(sorted(index.allowed_tokens(s, b)),
                                     brute_mask(vocab, s, b), (schema, s, b))
                    compared += 1
        self.assertGreater(compared, 20)


if __name__ == "__main__":
    unittest.main()
