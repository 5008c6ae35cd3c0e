"""Post-instruction and first-reply positions (``orthoreg.reader.positions.token_positions``) under the chat
templates of the common model families, with tokenizers and templates built here (no network).

Each family's template is its shipped Jinja (paraphrased where it has tool-calling branches a single user turn never
reaches; the special-token structure is exact), and its tokenizer is a small BPE trained in code the way the family
tokenises: byte-level BPE (GPT-2 / Qwen / Llama-3 pre-tokenisation) for ChatML and Llama-3, SentencePiece-style BPE
for the others (the "legacy" Llama normaliser that prepends "▁" to every text segment for Llama-2, Mistral v0.1,
Phi-3 and Zephyr; a ``Metaspace`` pre-tokeniser for Mistral v0.3; Gemma's bare space→"▁" replacement), with the
family's special tokens (Phi-3's ``rstrip`` ones included). Every case runs twice: with the fast tokenizer's
character offsets and through the no-offsets fallback (a tokenizer whose ``return_offsets_mapping`` raises, as slow
tokenizers do).

The expectation is computed here by hand: the rendering must equal ``head + user text + suffix`` as written in the
family table; the post-instruction positions are the last len(suffix ids) positions of the prompt's ids, where the
suffix's ids are the suffix tokenised on its own (and must be the tail of the prompt's ids); the first-reply position
is len(prompt ids), and its token the first token after the prompt's in the whole conversation's tokenisation.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from orthoreg import InputSubspacesError, extract_template_subspaces
from orthoreg.reader.extraction import extract_input_subspaces
from orthoreg.reader.positions import token_positions
from orthoreg.reader.template import template_reader_modules
from tests._directions_helpers import make_tokenizer, one_torch_thread, tiny_config  # noqa: F401 - autouse fixture

# ------------------------------------------------------------------------------------------------ the templates
# HuggingFaceTB/SmolLM2-135M-Instruct
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen/Qwen2-0.5B-Instruct
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen/Qwen2.5-0.5B-Instruct (the tools branch and the tool-call / tool-response turns left out)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- raise_exception('tools are not part of this test') }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# meta-llama/Llama-3.1-8B-Instruct (the tool branches left out; the system header with the dates is always written)
LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# meta-llama/Llama-2-7b-chat-hf; with USE_DEFAULT_PROMPT (transformers' former Llama default template) a <<SYS>>
# block with the default system prompt opens the first user turn.
LLAMA2_SYSTEM = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible."
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% elif USE_DEFAULT_PROMPT == true and not '<<SYS>>' in messages[0]['content'] %}"
    "{% set loop_messages = messages %}{% set system_message = 'DEFAULT_SYSTEM_MESSAGE' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + content.strip() + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2_PLAIN = LLAMA2.replace("USE_DEFAULT_PROMPT == true", "false")
LLAMA2_SYS = LLAMA2.replace("USE_DEFAULT_PROMPT == true", "true").replace("DEFAULT_SYSTEM_MESSAGE", LLAMA2_SYSTEM)
# mistralai/Mistral-7B-Instruct-v0.1
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.3 (the tool branches left out)
MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{%- for message in loop_messages | rejectattr("role", "equalto", "tool") | rejectattr("role", "equalto", "tool_results") | selectattr("tool_calls", "undefined") %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501
# google/gemma-2b-it
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# microsoft/Phi-3-mini-4k-instruct
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta (rendered with trim_blocks / lstrip_blocks, as transformers does)
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# ------------------------------------------------------------------------------------------------ the tokenizers
CORPUS = [
    "How do I bake bread at home?", "Tell me a story about a dragon.", "Sure, here is how to bake bread.",
    "Sure! Once upon a time there was a dragon.", "You are a helpful assistant named after a model.",
    "Write a short poem about the sea.", "Explain how the end of the story works.", "Sure, here is a poem.",
    "The assistant and the user talk about the model.", "I can help you with that, here is how.",
] * 4
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_bpe(split: str, specials: list[str], **names: str) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with ``split`` as the pre-tokenisation regex."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


def sentencepiece_bpe(style: str, specials: list[str], stripped: tuple[str, ...] = (),
                      **names: str) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (no merge across a "▁"), tokenising at run time as the family's tokenizer.json:
    ``legacy`` (Llama-2 / Mistral v0.1 / Phi-3 / Zephyr: prepend "▁" to each text segment, spaces → "▁"),
    ``metaspace`` (Mistral v0.3: a Metaspace pre-tokeniser, prepend_scheme "first") or ``gemma`` (spaces → "▁")."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list(string.printable.strip()) + ["▁", "\n"])
    backend.train_from_iterator(CORPUS, trainer=trainer)
    if style == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    elif style == "metaspace":
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = None
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always" if style != "gemma" else "never")
    if stripped:  # Phi-3's role and end tokens swallow the whitespace after them
        backend.add_special_tokens([AddedToken(t, rstrip=True, normalized=False, special=True) for t in stripped])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


CHATML = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
LLAMA3_NAMES = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
LLAMA_NAMES = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
TOKENIZERS = {
    "gpt2": lambda: byte_level_bpe(GPT2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], **CHATML),
    "qwen": lambda: byte_level_bpe(QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], **CHATML),
    "llama3": lambda: byte_level_bpe(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                    "<|end_header_id|>", "<|eot_id|>"], **LLAMA3_NAMES),
    "llama": lambda: sentencepiece_bpe("legacy", LLAMA_SPECIALS, **LLAMA_NAMES),
    "mistral_v3": lambda: sentencepiece_bpe("metaspace", LLAMA_SPECIALS + ["[INST]", "[/INST]"], **LLAMA_NAMES),
    "gemma": lambda: sentencepiece_bpe("gemma", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                 "<end_of_turn>"], bos_token="<bos>", eos_token="<eos>",
                                       unk_token="<unk>", pad_token="<pad>"),
    "phi3": lambda: sentencepiece_bpe("legacy", LLAMA_SPECIALS + ["<|endoftext|>", "<|system|>"],
                                      ("<|assistant|>", "<|end|>", "<|user|>"),
                                      bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                                      pad_token="<|endoftext|>"),
}


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    tokenizer: str  # a key of TOKENIZERS
    head: str  # the rendering before the user's text
    suffix: str  # the rendering after it: the post-instruction text, generation prompt included
    reply_tail: str  # what the assistant turn appends after the reply (the reply is placed right after the suffix)
    trims: bool = False  # the template strips the user's text
    suffix_alone: str | None = None  # the text whose own tokenisation is the suffix's tokens (default: suffix)
    reply_lead: str = ""  # what the assistant turn writes before the reply


CHATML_TAIL = "<|im_end|>\n"
FAMILIES = [
    Family("smollm2", SMOLLM2, "gpt2", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
           "by Hugging Face<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", CHATML_TAIL),
    Family("qwen2", QWEN2, "qwen", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
           "<|im_end|>\n<|im_start|>assistant\n", CHATML_TAIL),
    Family("qwen2.5", QWEN25, "qwen", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
           "helpful assistant.<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", CHATML_TAIL),
    Family("llama3", LLAMA3, "llama3", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", trims=True),
    Family("llama3.1", LLAMA31, "llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\n",
           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", trims=True),
    Family("llama2", LLAMA2_PLAIN, "llama", "<s>[INST] ", " [/INST]", " </s>", trims=True, suffix_alone="[/INST]",
           reply_lead=" "),
    Family("llama2-sys", LLAMA2_SYS, "llama", f"<s>[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n", " [/INST]",
           " </s>", trims=True, suffix_alone="[/INST]", reply_lead=" "),
    Family("mistral-v0.1", MISTRAL_V01, "llama", "<s>[INST] ", " [/INST]", "</s> ", suffix_alone="[/INST]"),
    Family("mistral-v0.3", MISTRAL_V03, "mistral_v3", "<s>[INST] ", "[/INST]", "</s>", reply_lead=" "),
    Family("gemma", GEMMA, "gemma", "<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
           "<end_of_turn>\n", trims=True),
    Family("phi3", PHI3, "phi3", "<|user|>\n", "<|end|>\n<|assistant|>\n", "<|end|>\n<|endoftext|>"),
    Family("zephyr", ZEPHYR, "llama", "<|user|>\n", "</s>\n<|assistant|>\n", "</s>\n"),
]
BY_NAME = {f.name: f for f in FAMILIES}
# Short prompts that also occur in some template's own text ("assistant", "INST", "model", "end") must still be
# found where the user's text is, not in the generation prompt; a trailing newline is the user's text, not the
# template's.
PROMPTS = ["How do I bake bread at home?", "Tell me a story about a dragon.\n", "assistant", "INST", "model", "end"]
REPLY = "Sure, here is how to bake bread."


@cache
def backend(kind: str) -> PreTrainedTokenizerFast:
    return TOKENIZERS[kind]()


@cache
def tokenizer(family: str) -> PreTrainedTokenizerFast:
    tok = TOKENIZERS[BY_NAME[family].tokenizer]()
    tok.chat_template = BY_NAME[family].template
    return tok


class NoOffsets:
    """A tokenizer without character offsets (a slow tokenizer's behaviour): ``return_offsets_mapping`` raises."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, return_offsets_mapping: bool = False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tok(*args, **kwargs)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(family: Family, tok, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, post-instruction positions), from the family table, independently of the code under test."""
    user = prompt.strip() if family.trims else prompt
    text = family.head + user + family.suffix
    assert tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True) == text  # the template renders as the table says
    ids = encode(tok, text)
    tail = encode(tok, family.suffix if family.suffix_alone is None else family.suffix_alone)
    assert 0 < len(tail) < len(ids) and ids[-len(tail):] == tail, "the suffix's own tokens end the prompt's"
    assert encode(tok, family.head + user) == ids[:-len(tail)]  # and the user's text ends where they start
    return ids, list(range(len(ids) - len(tail), len(ids)))


def expected_reply(family: Family, tok, prompt: str, prompt_ids: list[int]) -> list[int]:
    """The reply's tokens as the whole conversation tokenises them, after the prompt's."""
    user = prompt.strip() if family.trims else prompt
    full = family.head + user + family.suffix + family.reply_lead + REPLY + family.reply_tail
    assert tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": REPLY}],
                                   tokenize=False) == full
    ids = encode(tok, full)
    assert ids[:len(prompt_ids)] == prompt_ids
    first = tok.convert_ids_to_tokens(ids[len(prompt_ids)])
    word = first.replace("▁", " ").replace("Ġ", " ").strip()
    assert word and REPLY.startswith(word), f"the first reply token {first!r} is not the reply's first word's"
    return ids[len(prompt_ids):]


@pytest.fixture(params=["offsets", "no_offsets"])
def wrap(request):
    return (lambda tok: tok) if request.param == "offsets" else NoOffsets


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_post_instruction_and_first_reply_positions(family, prompt, wrap):
    fam, tok = BY_NAME[family], tokenizer(family)
    prompt_ids, post = expected(fam, tok, prompt)
    subject = wrap(tok)

    ids, selected, to_generate = token_positions(subject, prompt, ["post_instruction"], chat_template=True)
    assert (ids, selected, to_generate) == (prompt_ids, post, 0)

    # greedy first reply: the prompt's ids, and the position the generated token will take
    ids, selected, to_generate = token_positions(subject, prompt, ["post_instruction", "first_reply"],
                                                 chat_template=True, reply=None, reply_tokens=1)
    assert (ids, selected, to_generate) == (prompt_ids, post + [len(prompt_ids)], 1)

    # a given reply: its first tokens as the conversation tokenises them
    reply_ids = expected_reply(fam, tok, prompt, prompt_ids)
    for n in (1, 3):
        ids, selected, to_generate = token_positions(subject, prompt, ["post_instruction", "first_reply"],
                                                     chat_template=True, reply=REPLY, reply_tokens=n)
        assert ids == prompt_ids + reply_ids[:n] and to_generate == 0
        assert selected == post + list(range(len(prompt_ids), len(prompt_ids) + n))


def test_the_family_tokenizers_tokenise_as_their_families():
    """The tokenizers behave like the families' own in the ways that matter here."""
    llama = backend("llama")
    # the legacy normaliser prepends "▁" to each text segment, so "[INST]" after "<s>" starts with "▁"
    assert llama.convert_ids_to_tokens(encode(llama, "<s>[INST]"))[1].startswith("▁")
    # ... and a reply tokenised on its own, " Sure", starts with a lone "▁" that the conversation never has
    assert llama.convert_ids_to_tokens(encode(llama, " Sure"))[0] == "▁"
    phi3 = backend("phi3")  # the role / end tokens swallow the newline after them
    assert phi3.convert_ids_to_tokens(encode(phi3, "<|end|>\n<|assistant|>\n")) == ["<|end|>", "<|assistant|>"]
    v3 = backend("mistral_v3")  # [INST] / [/INST] are control tokens of Mistral v0.3, plain text for v0.1
    assert v3.convert_ids_to_tokens(encode(v3, "[INST] hi[/INST]"))[0] == "[INST]"
    assert v3.convert_ids_to_tokens(encode(v3, "[INST] hi[/INST]"))[-1] == "[/INST]"
    assert len(encode(llama, "[/INST]")) > 1


def test_a_template_that_rewrites_the_message_is_refused_with_the_fix():
    tok = TOKENIZERS["qwen"]()
    tok.chat_template = QWEN2.replace("message['content']", "message['content'] | upper")
    with pytest.raises(InputSubspacesError, match=r"does not appear in the chat-template rendering.*positions='prompt'"):
        token_positions(tok, "how do I bake bread", ["post_instruction"], chat_template=True)
    tok.chat_template = QWEN2.replace("message['content']", "'(a message)'")  # drops the user's text
    with pytest.raises(InputSubspacesError, match=r"does not appear in the chat-template rendering.*positions='prompt'"):
        token_positions(tok, "how do I bake bread", ["post_instruction"], chat_template=True)


def test_a_tokenizer_without_a_chat_template_is_told_the_fix():
    tok = TOKENIZERS["llama3"]()  # no chat_template set
    assert not tok.chat_template
    lm = LlamaForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    with pytest.raises(InputSubspacesError, match=r"needs a chat template.*tokenizer\.chat_template"):
        extract_input_subspaces(lm, tok, PROMPTS[:2], modules=["mlp.up_proj"], k=1, positions="post_instruction")
    with pytest.raises(InputSubspacesError, match=r"no chat template.*set tokenizer\.chat_template"):
        extract_template_subspaces(lm, tok, PROMPTS[:2], k=1)
    with pytest.raises(InputSubspacesError, match="no chat template"):
        extract_input_subspaces(lm, tok, PROMPTS[:2], modules=["mlp.up_proj"], k=1, positions="first_reply",
                                chat_template=True)


# ------------------------------------------------------------------------------------------------ end to end
E2E_PROMPTS = ["How do I bake bread at home?", "Tell me a story about a dragon.", "Write a short poem about the sea.",
               "Explain how the end of the story works.", "I can help you with that", "the model and the user"]


def tiny_model(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        max_position_embeddings=128)).eval()


def hand_collected(lm, rows: list[tuple[list[int], list[int]]], modules: list[str]) -> dict[str, torch.Tensor]:
    """{module: (N, d_in) float64} inputs at the given positions, one prompt at a time."""
    out = {m: [] for m in modules}
    for ids, positions in rows:
        seen = {}
        handles = [lm.get_submodule(m).register_forward_pre_hook(
            lambda mod, args, m=m, seen=seen: seen.__setitem__(m, args[0][0].double())) for m in modules]
        with torch.no_grad():
            lm(input_ids=torch.tensor([ids]))
        for h in handles:
            h.remove()
        for m in modules:
            out[m].append(seen[m][positions])
    return {m: torch.cat(r) for m, r in out.items()}


def projector(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v.T @ v


def test_template_subspaces_end_to_end_under_llama3():
    fam, tok = BY_NAME["llama3"], tokenizer("llama3")
    lm = tiny_model(tok)
    got = extract_template_subspaces(lm, tok, E2E_PROMPTS, k=3, batch_size=4)  # greedy first reply token
    rows = []
    for prompt in E2E_PROMPTS:
        ids, post = expected(fam, tok, prompt)
        with torch.no_grad():
            greedy = int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        rows.append((ids + [greedy], post + [len(ids)]))
    modules = template_reader_modules(lm)
    assert sorted(got.names) == sorted(modules) and got.metadata["num_positions"] == sum(len(p) for _, p in rows)
    inputs = hand_collected(lm, rows, modules)
    for name in modules:
        ref = torch.linalg.svd(inputs[name], full_matrices=False).Vh[:3]
        assert torch.dist(projector(got[name]), projector(ref)) < 1e-6, name


def test_input_subspaces_end_to_end_under_gemma_with_replies():
    fam, tok = BY_NAME["gemma"], tokenizer("gemma")
    lm = tiny_model(tok, seed=1)
    modules = ["model.layers.1.mlp.up_proj", "model.layers.2.self_attn.q_proj"]
    replies = [REPLY] * len(E2E_PROMPTS)
    got = extract_input_subspaces(lm, tok, E2E_PROMPTS, modules=modules, k=3, replies=replies, reply_tokens=2,
                                  positions=("post_instruction", "first_reply"), batch_size=4)
    rows = []
    for prompt in E2E_PROMPTS:
        ids, post = expected(fam, tok, prompt)
        reply_ids = expected_reply(fam, tok, prompt, ids)[:2]
        rows.append((ids + reply_ids, post + [len(ids), len(ids) + 1]))
    assert got.metadata["num_positions"] == sum(len(p) for _, p in rows)
    inputs = hand_collected(lm, rows, modules)
    for name in modules:
        ref = torch.linalg.svd(inputs[name], full_matrices=False).Vh[:3]
        assert torch.dist(projector(got[name]), projector(ref)) < 1e-6, name
