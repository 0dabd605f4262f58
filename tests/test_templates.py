"""Prompt templates: exact text of alpaca and chatml, Hugging Face chat templates rendered as transformers renders
them (checked against transformers itself), response masks from prefixes, and the prompt that generation uses."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_jax.config import DataConfig
from llm_jax.data import examples, templates, tokenizer
from llm_jax.data.documents import DataError
from llm_jax.data.templates import EOS, Message, TemplateError

transformers = pytest.importorskip("transformers")

BYTES = tokenizer.ByteTokenizer()

# Qwen2's template (a default system turn when the conversation has none).
CHATML_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's template, verbatim: bos_token, trim, and the header of the next turn as the generation prompt.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# A Llama 2-style template over several lines, so trim_blocks and lstrip_blocks decide its whitespace;
# raise_exception refuses turns that do not alternate, and eos_token ends each answer.
LLAMA2_LIKE = """{% if messages[0]['role'] == 'system' %}
  {% set system = messages[0]['content'] %}
  {% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {% endif %}
  {% if message['role'] == 'user' %}
{{ bos_token }}[INST] {% if loop.first and system is defined %}<<SYS>>
{{ system }}
<</SYS>>

{% endif %}{{ message['content'] }} [/INST]
  {% else %}
 {{ message['content'] }}{{ eos_token }}
  {% endif %}
{% endfor %}
"""
TEMPLATES = {"chatml_like": (CHATML_LIKE, "<|im_end|>\n"), "llama3": (LLAMA3, "<|eot_id|>"),
             "llama2_like": (LLAMA2_LIKE, "</s>\n")}
SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

CONVERSATIONS = {
    "one_turn": [("user", "Name a primary colour."), ("assistant", "Red.")],
    "multi_turn_system": [("system", "You answer in one line."), ("user", "What is 2+2?"), ("assistant", "4"),
                          ("user", "And times 3?"), ("assistant", "  12, since (2+2) x 3 = 12.  ")],
    "chinese": [("user", "识别并解释给定列表中的两个科学理论：细胞理论和日心说。"), ("assistant", "细胞理论认为所有生命体都由细胞构成。"),
                ("user", "再简短一些。"), ("assistant", "生命由细胞构成；太阳是中心。")],
}


def messages(name):
  return [Message(role, content) for role, content in CONVERSATIONS[name]]


def as_dicts(conversation):
  return [{"role": m.role, "content": m.content} for m in conversation]


def hf_folder(tmp_path, source, specials=SPECIALS):
  """A transformers tokenizer folder: a real BPE tokenizer.json and a tokenizer_config.json holding `source`."""
  folder = tmp_path / "hf"
  folder.mkdir(exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin_of_text|>", "<|eot_id|>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([content for conv in CONVERSATIONS.values() for _, content in conv] * 3, trainer)
  tok.save(str(folder / "tokenizer.json"))
  config = {**specials, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": source}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
  return folder


def test_alpaca_renders_stanford_alpacas_prompt_with_and_without_input():
  with_input = templates.render(templates.Alpaca(), [Message("user", "Translate.", "Bonjour"),
                                                     Message("assistant", "Hello")])
  assert with_input == [
      ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
       "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n"
       "### Response:\n", False), ("Hello", True), (EOS, True)]
  plain = templates.render(templates.Alpaca(), messages("multi_turn_system"))
  assert plain == [
      ("You answer in one line.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n", False), ("4", True), (EOS, True),
      ("\n\n### Instruction:\nAnd times 3?\n\n### Response:\n", False), ("  12, since (2+2) x 3 = 12.  ", True),
      (EOS, True)]


def test_chatml_ends_assistant_turns_with_eos_and_drops_the_untrained_tail():
  parts = templates.render(templates.ChatML(), messages("multi_turn_system") + [Message("user", "Thanks!")])
  assert parts == [
      ("<|im_start|>system\nYou answer in one line.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
       "<|im_start|>assistant\n", False), ("4", True), (EOS, True),
      ("\n<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n", False),
      ("  12, since (2+2) x 3 = 12.  ", True), (EOS, True)]  # the last user turn trains nothing: gone


@pytest.mark.parametrize("template_name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_renders_as_transformers_does(tmp_path, template_name, conversation):
  source, _ = TEMPLATES[template_name]
  folder = hf_folder(tmp_path, source)
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
  ours = templates.load_chat_template(folder / "tokenizer_config.json")
  assert (ours.source, ours.bos_token, ours.eos_token) == (source, "<|begin_of_text|>", "<|eot_id|>")
  conv = messages(conversation)
  if template_name == "llama2_like":
    ours = templates.ChatTemplate(source, "test", bos_token="<s>", eos_token="</s>")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(hf_folder(
        tmp_path, source, {"bos_token": "<s>", "eos_token": "</s>"})))
  for end in range(1, len(conv) + 1):  # every prefix, with and without the generation prompt
    for add_generation_prompt in (False, True):
      want = reference.apply_chat_template(as_dicts(conv[:end]), tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
      assert ours.render(conv[:end], add_generation_prompt) == want, (end, add_generation_prompt)


@pytest.mark.parametrize("template_name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_trains_each_response_and_its_end_of_turn(tmp_path, template_name, conversation):
  source, end_of_turn = TEMPLATES[template_name]
  template = templates.ChatTemplate(source, "test", bos_token="<s>", eos_token="</s>")
  conv = messages(conversation)
  parts = templates.render(template, conv)
  whole = templates.render_chat_template(source, as_dicts(conv), add_generation_prompt=False, bos_token="<s>",
                                         eos_token="</s>")
  assert "".join(text for text, _ in parts) == whole  # the conversation ends with an answer: nothing dropped
  lead = " " if template_name == "llama2_like" else ""  # its answers follow "[/INST] "
  answer = (lambda c: c.strip()) if template_name == "llama3" else (lambda c: c)  # Llama 3 trims contents
  assert [text for text, trained in parts if trained] == [
      lead + answer(m.content) + end_of_turn for m in conv if m.role == "assistant"]
  assert all(not trained for text, trained in parts if "user" in text or "[INST]" in text)


def test_template_errors_are_one_line(tmp_path):
  alternating = templates.ChatTemplate(LLAMA2_LIKE, "llama2.json", bos_token="<s>", eos_token="</s>")
  with pytest.raises(TemplateError, match=r"^the chat template of llama2.json refused the conversation: Conversation "
                                          r"roles must alternate user/assistant/user/assistant/...; fix the record"):
    templates.render(alternating, [Message("user", "a"), Message("user", "b"), Message("assistant", "c")])
  rewrites = templates.ChatTemplate("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]"
                                    "{% endif %}{{ m.content }}{% endfor %}", "thinking.jinja")
  with pytest.raises(TemplateError, match=r"renders an assistant turn differently once more turns follow \(seen at message 5\)"):
    templates.render(rewrites, messages("multi_turn_system"))
  broken = templates.ChatTemplate("{% for m in messages %}{{ m.content }", "broken.jinja")
  with pytest.raises(TemplateError, match=r"^the chat template of broken.jinja is not valid jinja \(.* at line 1\)"):
    templates.render(broken, messages("one_turn"))
  with pytest.raises(TemplateError, match=r"data.chat_template='.*nowhere.json': no such file or folder"):
    templates.load_chat_template(tmp_path / "nowhere.json")
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
  with pytest.raises(TemplateError, match=r"holds no chat template; pass the tokenizer_config.json of a chat model"):
    templates.load_chat_template(tmp_path / "plain")
  (tmp_path / "list.json").write_text("[1, 2]")
  with pytest.raises(TemplateError, match=r"list.json holds a JSON list, not an object"):
    templates.load_chat_template(tmp_path / "list.json")
  with pytest.raises(TemplateError, match=r"data.template=tokenizer, but ByteTokenizer\(\) has no chat template; set "
                                          r"data.chat_template="):
    templates.from_config(DataConfig(format="chat", template="tokenizer"), BYTES)
  for error in (alternating, rewrites, broken):
    try:
      templates.render(error, [Message("user", "a"), Message("user", "b"), Message("assistant", "c")])
    except TemplateError as e:
      assert "\n" not in str(e)


def test_load_chat_template_prefers_chat_template_jinja_and_special_tokens_map(tmp_path):
  """As transformers: chat_template.jinja over the config's template, special_tokens_map.json over its names; a
  config's list of named templates gives "default"."""
  folder = hf_folder(tmp_path, [{"name": "default", "template": CHATML_LIKE}, {"name": "tool_use", "template": "x"}])
  assert templates.load_chat_template(folder).source == CHATML_LIKE
  (folder / "chat_template.jinja").write_text(LLAMA3)
  (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
  loaded = templates.load_chat_template(folder)
  assert (loaded.source, loaded.bos_token, loaded.eos_token) == (LLAMA3, "<s>", "</s>")
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
  conv = as_dicts(messages("chinese"))
  assert loaded.render(messages("chinese"), True) == reference.apply_chat_template(conv, tokenize=False,
                                                                                   add_generation_prompt=True)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
  """A sentencepiece model trained here on English and Chinese text, so a prompt spans many merged pieces."""
  folder = tmp_path_factory.mktemp("spm")
  lines = [f"Below is an instruction number {i} that describes a task; write a response. 细胞理论 {i} 日心说"
           for i in range(300)] + [content for conv in CONVERSATIONS.values() for _, content in conv] * 20
  (folder / "text.txt").write_text("\n".join(lines))
  return tokenizer.load_tokenizer(str(tokenizer.train_sentencepiece([str(folder / "text.txt")], 400,
                                                                    str(folder / "sp.model"))))


@pytest.mark.parametrize("name", ["alpaca", "chatml", "tokenizer"])
@pytest.mark.parametrize("tokenizer_name", ["byte", "sentencepiece"])
def test_render_prompt_is_what_training_saw_before_the_response(tmp_path, sentencepiece, name, tokenizer_name):
  tok = BYTES if tokenizer_name == "byte" else sentencepiece
  data = DataConfig(format="chat", template=name, chat_template=str(hf_folder(tmp_path, CHATML_LIKE)))
  template = templates.from_config(data, tok)
  for text, answer in [("Name a primary colour.", "Red."), ("再简短一些。", "生命由细胞构成。")]:
    conversation = templates.Conversation((Message("user", text), Message("assistant", answer)), "test")
    (tokens,) = examples.encode([conversation], template, tok, seq_len=4096)
    first = int(np.argmax(tokens.trained))
    prompt = templates.render_prompt(template, text)
    assert tokens.ids[:first].tolist() == tok.encode(prompt)
    if name == "tokenizer":  # the template's own end of turn, as text
      assert tok.decode(tokens.ids[first:]) == answer + "<|im_end|>\n" and tokens.trained[first:].all()
    else:
      assert tok.decode(tokens.ids[first:]) == answer and tokens.ids[-1] == tok.eos_id and tokens.trained[first:].all()
  assert templates.render_prompt(templates.Alpaca(), "Say hi.") == (
      "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nSay hi.\n\n### Response:\n")
  assert templates.render_prompt(templates.ChatML(), "Say hi.") == (
      "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")


def test_template_errors_in_the_pipeline_name_the_record(tmp_path):
  template = templates.ChatTemplate(LLAMA2_LIKE, "llama2.json", bos_token="<s>", eos_token="</s>")
  bad = templates.Conversation((Message("user", "a"), Message("user", "b"), Message("assistant", "c")),
                               "chat.jsonl line 7")
  with pytest.raises(DataError, match=r"^chat.jsonl line 7: the chat template of llama2.json refused the conversation"):
    examples.encode([bad], template, BYTES, seq_len=64)


def test_hugging_face_tokenizer_with_its_own_template_gives_transformers_ids(tmp_path):
  """data.template=tokenizer with a tokenizer.json folder: the example's ids are the ids transformers'
  apply_chat_template(tokenize=True) gives, and the trained ones are each answer and its <|im_end|>\\n."""
  folder = tmp_path / "qwen_like"
  folder.mkdir()
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([content for conv in CONVERSATIONS.values() for _, content in conv] * 3, trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_LIKE,
       "tokenizer_class": "PreTrainedTokenizerFast"}))
  ours = tokenizer.load_tokenizer(str(folder))
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
  template = templates.from_config(DataConfig(format="chat", template="tokenizer"), ours)
  end_id = reference.convert_tokens_to_ids("<|im_end|>")
  for name in CONVERSATIONS:
    conv = messages(name)
    (tokens,) = examples.encode([templates.Conversation(tuple(conv), name)], template, ours, seq_len=4096)
    want = reference.apply_chat_template(as_dicts(conv), tokenize=True, return_dict=True)["input_ids"]
    assert tokens.ids.tolist() == list(want)
    answers = [m.content for m in conv if m.role == "assistant"]
    spans = np.split(np.flatnonzero(tokens.trained), np.flatnonzero(np.diff(np.flatnonzero(tokens.trained)) > 1) + 1)
    assert [reference.decode(tokens.ids[s]) for s in spans] == [a + "<|im_end|>\n" for a in answers]
    assert [int(tokens.ids[s][-2]) for s in spans] == [end_id] * len(answers) == [ours.eos_id] * len(answers)
  # A template that prints bos_token needs its text, which a tokenizer object does not name: data.chat_template does.
  (folder / "chat_template.jinja").write_text(LLAMA3)
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
  llama = tokenizer.load_tokenizer(str(folder))
  with pytest.raises(TemplateError, match=r"prints bos_token, whose text this tokenizer does not name; set "
                                          r"data.chat_template to its tokenizer_config.json"):
    templates.from_config(DataConfig(format="chat", template="tokenizer"), llama)
  named = templates.from_config(DataConfig(format="chat", template="tokenizer", chat_template=str(folder)), llama)
  assert named.render(messages("one_turn"), False).startswith("<|im_start|><|start_header_id|>user")
