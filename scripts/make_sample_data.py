#!/usr/bin/env python
"""Build the small sample data sets in ``data/sample/`` (MiniMind's jsonl formats), deterministically.

  python scripts/make_sample_data.py [--out data/sample] [--check]

Writes eight files, each line one JSON object in exactly MiniMind's schema:

* ``pretrain.jsonl``       ``{"text": ...}``: hand-written English / Chinese prose, the Zen of Python, templated
                           English and Chinese stories and facts, and blocks of checkable task text
                           (``12+35=47``, ``reverse: abc -> cba`` ...).
* ``sft.jsonl``            ``{"conversations": [{"role", "content", optional "reasoning_content"}, ...]}``:
                           single- and multi-turn chats, some with a system prompt, answering tasks whose answers
                           can be checked (arithmetic, copying, reversing, counting letters, sorting) plus small talk.
* ``dpo.jsonl``            ``{"chosen": [messages], "rejected": [messages]}``: the same task prompt, chosen = the
                           correct answer, rejected = a plausible wrong one.
* ``reason.jsonl``         SFT format whose assistant content is
                           ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`` (the thinking shows the
                           worked steps: column addition with carries, borrowing, ...).
* ``lora_identity.jsonl``  SFT-format conversations teaching the model its name (MiniMind-JAX).
* ``sft_tools.jsonl``      MiniMind-3's tool-use SFT format: a system message with ``tools`` as a JSON *string*,
                           an assistant turn with ``tool_calls`` as a JSON string, a ``tool`` turn with the
                           result, the final answer (some with ``reasoning_content``).
* ``rlaif.jsonl``          MiniMind's RL prompt format: ``{"conversations": [user, assistant ""], "gt"}``, the
                           empty assistant message is the slot to generate; the tasks (arithmetic, copying,
                           sorting ...) are checkable against ``gt``.
* ``agent_rl.jsonl``       MiniMind-3's agent-RL format: system (tools as a JSON string), user, assistant slot,
                           plus ``gt``: the values the final answer must contain (calculator / unit conversion).

Everything comes from text written in this file, ``this`` (the Zen of Python) and seeded ``random.Random``
generators (string seeds, one per file; ``randrange`` / ``choice`` / ``shuffle`` give the same results on every
CPython 3 since 3.2), so running it twice - on any machine, any Python version - gives byte-identical files.
Standard-library docstrings are deliberately not used: they change between Python versions.

``--check`` regenerates into a temporary directory and compares the bytes with the files in ``--out``; it exits
1 (naming the files that differ) if they are not identical.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import filecmp
import io
import json
import os
import random
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "data", "sample")
FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "reason.jsonl", "lora_identity.jsonl", "sft_tools.jsonl",
         "rlaif.jsonl", "agent_rl.jsonl")
SEED = "minimind-jax-sample-v1"

N_PRETRAIN = 4000
N_SFT = 1500
N_DPO = 300
N_REASON = 300
N_IDENTITY = 100
N_TOOLS = 200
N_RLAIF = 300
N_AGENT = 200

MODEL_NAME = "MiniMind-JAX"

# ------------------------------------------------------------------------------------------------------------
# Hand-written material

ENGLISH_PROSE = [
    "A language model reads text one token at a time and learns to guess the next token. After seeing enough "
    "examples it picks up spelling, grammar, simple facts and even a little arithmetic.",
    "Small models are useful for learning. They train in minutes, fit on a laptop, and make it easy to see how "
    "each part of the training pipeline changes the result.",
    "The river starts as a thin stream high in the mountains. It gathers water from rain and melting snow, grows "
    "wider as it flows through the valley, and finally reaches the sea.",
    "Bread is made from flour, water, salt and yeast. The yeast eats sugar in the dough and releases gas, which "
    "makes the bread rise before it is baked in a hot oven.",
    "In spring the days grow longer and the trees turn green. Farmers plant seeds, birds build nests, and children "
    "play outside until the sun goes down.",
    "To add two numbers on paper, write one above the other and start from the right. Add the digits in each "
    "column; if a column sum is ten or more, write the last digit and carry one to the next column.",
    "A library is a quiet place full of books. People come to read, to study, to borrow stories for their "
    "children, or simply to sit by the window and think.",
    "The moon does not make its own light. It reflects light from the sun, and as it moves around the earth we see "
    "different parts of it lit up: new moon, half moon and full moon.",
    "Good habits are built slowly. Reading ten pages a day, walking after dinner, or writing a short note each "
    "evening seems small, but over a year it adds up to a lot.",
    "Computers store everything as numbers. Letters, pictures and sounds are all turned into long lists of zeros "
    "and ones that the machine can copy, compare and change very quickly.",
    "A good teacher explains an idea in more than one way. If the first explanation does not work, they try a "
    "picture, an example or a story until the student understands.",
    "When it rains, water soaks into the ground and fills rivers and lakes. The sun warms the water, some of it "
    "turns into vapour, rises into the sky and forms new clouds.",
    "Sorting means putting things in order. To sort a list of numbers from small to large, you can repeatedly pick "
    "the smallest number that is left and move it to the end of a new list.",
    "Cats sleep for most of the day and are often awake at night. Dogs like to walk, play and stay close to the "
    "people they live with.",
    "A map is a small picture of a large place. It shows roads, rivers, mountains and towns, and a scale tells you "
    "how far apart they really are.",
    "Every word is made of letters. Counting how many times a letter appears in a word is a simple task: look at "
    "each letter in turn and add one whenever it matches.",
    "The ocean covers most of the surface of the earth. It is home to fish, whales, coral and countless tiny "
    "creatures that are too small to see without a microscope.",
    "Learning a new language takes patience. At first every sentence is hard, but after many small steps the words "
    "begin to feel familiar and the grammar starts to make sense.",
    "A train leaves the station at eight in the morning and arrives in the city two hours later. Passengers read, "
    "sleep, talk with friends or watch the fields pass by the window.",
    "Honest answers are better than confident guesses. If you do not know something, it is fine to say so and to "
    "explain how you could find out.",
    "Reversing a word means reading it from the last letter to the first. The word stop reversed is pots, and the "
    "word level reads the same in both directions.",
    "Plants need light, water and air to grow. Their leaves use sunlight to turn water and carbon dioxide into "
    "sugar, and they release oxygen that animals breathe.",
    "A recipe is a list of steps. If you follow the steps in order and measure carefully, the result is usually the "
    "same every time, which is what makes a recipe useful.",
    "Mountains are cold at the top even in summer, because the air gets thinner and cooler as you climb higher.",
]

CHINESE_PROSE = [
    "语言模型一次读入一个词元，并学习预测下一个词元。看过足够多的例子以后，它就能学会拼写、语法、一些简单的知识，甚至一点算术。",
    "小模型很适合用来学习。它们几分钟就能训练完，在普通电脑上也能运行，让我们清楚地看到训练过程中每一步的作用。",
    "春天来了，天气越来越暖和。小草从地里钻出来，树上长出了新的叶子，燕子从南方飞回来，孩子们在公园里放风筝。",
    "夏天的中午太阳很大，人们喜欢在树下乘凉。到了晚上，天空中有很多星星，青蛙在河边唱歌。",
    "秋天是收获的季节。田里的稻子黄了，果园里的苹果红了，农民们忙着把粮食运回家。",
    "冬天很冷，北方常常下雪。孩子们穿上厚厚的衣服，在雪地里堆雪人、打雪仗，玩得非常开心。",
    "做两位数加法时，先把个位上的数相加，如果满十，就向十位进一；再把十位上的数和进上来的一相加。",
    "图书馆是一个安静的地方。人们在这里读书、学习、查资料，有时候也只是坐在窗边想一想问题。",
    "学习一门新的语言需要耐心。开始的时候每句话都很难，但是每天坚持练习，慢慢地就会觉得越来越容易。",
    "月亮自己不会发光，它反射的是太阳的光。月亮绕着地球转，所以我们会看到新月、半月和满月。",
    "好的习惯是一点一点养成的。每天读十页书，饭后散散步，晚上写几句日记，一年下来就会有很大的变化。",
    "计算机把所有东西都保存成数字。文字、图片和声音都会变成很长的一串零和一，机器可以很快地复制和比较它们。",
    "排序就是把东西按顺序排好。要把一组数字从小到大排列，可以每次找出剩下的数里最小的那个，把它放到新的队伍后面。",
    "诚实的回答比自信的猜测更好。如果不知道答案，可以直接说不知道，再想一想怎样才能找到答案。",
    "长江是中国最长的河流，它从西部的高山流向东边的大海，沿途经过很多城市和乡村。",
    "植物生长需要阳光、水和空气。叶子利用阳光把水和二氧化碳变成养分，同时放出氧气。",
]

FACTS_EN = [
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What do bees make?", "Bees make honey."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("Which animal says meow?", "A cat says meow."),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What comes after Monday?", "Tuesday comes after Monday."),
    ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What do we use to write on paper?", "We use a pen or a pencil to write on paper."),
    ("Is the moon a star?", "No. The moon is not a star; it reflects light from the sun."),
]

FACTS_ZH = [
    ("晴天的时候天空是什么颜色？", "晴天的时候天空是蓝色的。"),
    ("一个星期有几天？", "一个星期有七天。"),
    ("一年有几个月？", "一年有十二个月。"),
    ("蜜蜂会做什么？", "蜜蜂会采花酿蜜。"),
    ("热的反义词是什么？", "热的反义词是冷。"),
    ("大的反义词是什么？", "大的反义词是小。"),
    ("什么动物会喵喵叫？", "小猫会喵喵叫。"),
    ("植物生长需要什么？", "植物生长需要阳光、水和空气。"),
    ("水结冰以后叫什么？", "水结冰以后叫冰。"),
    ("一天有多少个小时？", "一天有二十四个小时。"),
    ("星期一后面是星期几？", "星期一后面是星期二。"),
    ("太阳从哪边升起？", "太阳从东边升起。"),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("月亮会自己发光吗？", "不会，月亮反射的是太阳的光。"),
]

SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi, how are you?", "I'm doing well, thank you. What would you like to talk about?"),
    ("Thank you!", "You're welcome! Let me know if you need anything else."),
    ("Good morning.", "Good morning! I hope you have a nice day."),
    ("Can you help me with some math?", "Of course. Tell me the problem and I will work it out with you."),
    ("Goodbye.", "Goodbye! Have a great day."),
    ("你好！", "你好！有什么可以帮你的吗？"),
    ("谢谢你。", "不客气！还有其他问题可以随时问我。"),
    ("早上好。", "早上好！祝你今天过得愉快。"),
    ("你能帮我算数学题吗？", "当然可以，请把题目告诉我。"),
    ("再见！", "再见！祝你一切顺利。"),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly and exactly.",
    f"You are {MODEL_NAME}, a small language model. Keep answers short.",
    "You are a careful math tutor. Give the exact result.",
    "你是一个乐于助人的助手。",
    "你是一个认真的数学老师，请给出准确的答案。",
]

EN_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Lily", "Max",
            "Nora", "Oscar", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy"]
EN_PLACES = ["park", "library", "market", "beach", "garden", "school", "museum", "forest", "river", "farm",
             "station", "kitchen", "village", "hill", "lake", "bakery"]
EN_ANIMALS = ["cat", "dog", "bird", "rabbit", "horse", "duck", "fox", "frog", "owl", "sheep", "goat", "fish"]
EN_ADJS = ["small", "big", "quiet", "happy", "old", "young", "brown", "white", "black", "clever", "sleepy", "fast"]
EN_OBJECTS = ["apples", "books", "flowers", "pencils", "cups", "stones", "letters", "cookies", "boxes", "shells"]
EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EN_WEATHER = ["sunny", "rainy", "windy", "cloudy", "cold", "warm", "snowy", "bright"]
EN_FEELINGS = ["happy", "tired", "surprised", "calm", "curious", "proud", "hungry", "excited"]
EN_WORDS = ["apple", "banana", "cherry", "window", "garden", "letter", "rabbit", "yellow", "mirror", "summer",
            "pepper", "coffee", "bottle", "balloon", "kitten", "puzzle", "river", "planet", "school", "silver",
            "butter", "tomato", "orange", "forest", "button", "dinner", "little", "hammer", "sunset", "pillow"]

ZH_PEOPLE = ["小明", "小红", "小华", "小刚", "老师", "学生", "医生", "妈妈", "爸爸", "爷爷", "奶奶", "哥哥", "姐姐",
             "弟弟", "妹妹", "朋友", "同学", "工程师", "科学家", "农民", "司机", "厨师", "警察", "画家"]
ZH_PLACES = ["学校", "公园", "图书馆", "家里", "医院", "商店", "北京", "上海", "山上", "河边", "海边", "城市", "村子",
             "教室", "办公室", "花园", "厨房", "超市", "博物馆", "火车站", "广场", "操场"]
ZH_ACTIONS = ["看书", "写字", "跑步", "唱歌", "画画", "做饭", "学习数学", "读英语", "打篮球", "踢足球", "喝茶",
              "买水果", "种花", "休息", "工作", "散步", "聊天", "打扫房间", "听音乐", "写作业", "洗衣服", "照相"]
ZH_TIMES = ["今天", "昨天", "明天", "早上", "中午", "晚上", "周末", "春天", "夏天", "秋天", "冬天", "每天", "上午",
            "下午"]
ZH_OBJECTS = ["苹果", "香蕉", "西瓜", "书", "铅笔", "电脑", "手机", "桌子", "椅子", "杯子", "帽子", "鞋子", "面包",
              "鸡蛋", "牛奶", "花", "树", "气球"]
ZH_ANIMALS = ["小猫", "小狗", "小鸟", "兔子", "马", "鸭子", "狐狸", "青蛙", "熊猫", "老虎", "大象", "猴子", "金鱼"]
ZH_ADJS = ["漂亮", "可爱", "安静", "热闹", "干净", "高兴", "聪明", "勇敢", "认真", "快乐", "美丽", "温暖"]
ZH_WEATHER = ["晴天", "下雨", "刮风", "多云", "下雪", "很热", "很冷", "凉快"]
ZH_COLORS = ["红色", "黄色", "蓝色", "绿色", "白色", "黑色", "紫色", "橙色"]
ZH_DIGITS = "零一二三四五六七八九"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def zen_of_python() -> list[str]:
    """The Zen of Python's lines (``this`` prints it on import; it is stored ROT13-encoded as ``this.s``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines() if line.strip()]


def zh_number(n: int) -> str:
    """0..99 in Chinese characters (十二, 三十五 ...)."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = ("" if tens == 1 else ZH_DIGITS[tens]) + "十"
    return head + ("" if ones == 0 else ZH_DIGITS[ones])


# ------------------------------------------------------------------------------------------------------------
# Checkable tasks: each returns a Task(prompt_en, prompt_zh, answer, wrong, steps_en, steps_zh)


class Task:
    __slots__ = ("kind", "prompt_en", "prompt_zh", "answer", "wrong", "steps_en", "steps_zh", "plain")

    def __init__(self, kind, prompt_en, prompt_zh, answer, wrong, steps_en, steps_zh, plain):
        self.kind = kind
        self.prompt_en, self.prompt_zh = prompt_en, prompt_zh
        self.answer, self.wrong = answer, wrong  # the full correct / a wrong answer sentence
        self.steps_en, self.steps_zh = steps_en, steps_zh  # worked steps (lists of lines)
        self.plain = plain  # the bare task text for pretraining, e.g. "12+35=47"


def _num(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _wrong_number(rng: random.Random, correct: int) -> int:
    while True:
        w = correct + rng.choice([-10, -2, -1, 1, 2, 10, 100, -100])
        if w >= 0 and w != correct:
            return w


def add_steps(a: int, b: int) -> tuple[list[str], list[str]]:
    da, db = str(a)[::-1], str(b)[::-1]
    names = ["ones", "tens", "hundreds", "thousands", "ten-thousands"]
    zh_names = ["个位", "十位", "百位", "千位", "万位"]
    en, zh, carry = [f"Add {a} and {b} column by column, starting from the right."], [f"把{a}和{b}按位相加，从个位开始。"], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        extra_en = f" + {carry}" if carry else ""
        extra_zh = f"加进位{carry}" if carry else ""
        new_carry, digit = divmod(s, 10)
        en.append(f"{names[i].capitalize()}: {x} + {y}{extra_en} = {s}, write {digit}"
                  + (f", carry {new_carry}." if new_carry else "."))
        zh.append(f"{zh_names[i]}：{x}加{y}{extra_zh}等于{s}，写{digit}" + (f"，进{new_carry}。" if new_carry else "。"))
        carry = new_carry
    if carry:
        en.append(f"The final carry {carry} becomes the leading digit.")
        zh.append(f"最后的进位{carry}写在最高位。")
    en.append(f"So {a} + {b} = {a + b}.")
    zh.append(f"所以{a}+{b}={a + b}。")
    return en, zh


def sub_steps(a: int, b: int) -> tuple[list[str], list[str]]:
    da, db = str(a)[::-1], str(b)[::-1]
    names = ["ones", "tens", "hundreds", "thousands", "ten-thousands"]
    zh_names = ["个位", "十位", "百位", "千位", "万位"]
    en, zh, borrow = [f"Subtract {b} from {a} column by column, starting from the right."], [f"用{a}减去{b}，从个位开始按位相减。"], 0
    for i in range(len(da)):
        x = int(da[i]) - borrow
        y = int(db[i]) if i < len(db) else 0
        if x < y:
            en.append(f"{names[i].capitalize()}: {x} is less than {y}, borrow 1: {x + 10} - {y} = {x + 10 - y}.")
            zh.append(f"{zh_names[i]}：{x}比{y}小，借一当十，{x + 10}减{y}等于{x + 10 - y}。")
            borrow = 1
        else:
            en.append(f"{names[i].capitalize()}: {x} - {y} = {x - y}.")
            zh.append(f"{zh_names[i]}：{x}减{y}等于{x - y}。")
            borrow = 0
    en.append(f"So {a} - {b} = {a - b}.")
    zh.append(f"所以{a}-{b}={a - b}。")
    return en, zh


def task_add(rng: random.Random, lo=1, hi=3) -> Task:
    a, b = _num(rng, lo, hi), _num(rng, lo, hi)
    c, w = a + b, _wrong_number(rng, a + b)
    en, zh = add_steps(a, b)
    prompt_en = rng.choice([f"What is {a}+{b}?", f"Compute {a} + {b}.", f"What is {a} plus {b}?", f"{a}+{b}=?"])
    prompt_zh = rng.choice([f"{a}加{b}等于多少？", f"计算{a}+{b}。", f"请算一下{a}+{b}。"])
    return Task("add", prompt_en, prompt_zh, f"{a}+{b}={c}", f"{a}+{b}={w}", en, zh, f"{a}+{b}={c}")


def task_sub(rng: random.Random, lo=1, hi=3) -> Task:
    a, b = _num(rng, lo, hi), _num(rng, lo, hi)
    a, b = max(a, b), min(a, b)
    c, w = a - b, _wrong_number(rng, a - b)
    en, zh = sub_steps(a, b)
    prompt_en = rng.choice([f"What is {a}-{b}?", f"Compute {a} - {b}.", f"What is {a} minus {b}?", f"{a}-{b}=?"])
    prompt_zh = rng.choice([f"{a}减{b}等于多少？", f"计算{a}-{b}。", f"请算一下{a}-{b}。"])
    return Task("sub", prompt_en, prompt_zh, f"{a}-{b}={c}", f"{a}-{b}={w}", en, zh, f"{a}-{b}={c}")


def task_mul(rng: random.Random) -> Task:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c, w = a * b, _wrong_number(rng, a * b)
    en = [f"{a} times {b} means adding {a} to itself {b} times."]
    zh = [f"{a}乘{b}就是{b}个{a}相加。"]
    total = 0
    for i in range(b):
        total += a
        if i:
            en.append(f"{total - a} + {a} = {total}.")
            zh.append(f"{total - a}加{a}等于{total}。")
    en.append(f"So {a}*{b}={c}.")
    zh.append(f"所以{a}*{b}={c}。")
    return Task("mul", rng.choice([f"What is {a}*{b}?", f"What is {a} times {b}?"]),
                rng.choice([f"{a}乘{b}等于多少？", f"计算{a}*{b}。"]), f"{a}*{b}={c}", f"{a}*{b}={w}", en, zh,
                f"{a}*{b}={c}")


def _rand_string(rng: random.Random, lo=3, hi=8) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _mutate(rng: random.Random, s: str) -> str:
    i = rng.randrange(len(s))
    c = rng.choice([ch for ch in LETTERS if ch != s[i]])
    return s[:i] + c + s[i + 1:]


def task_copy(rng: random.Random) -> Task:
    s = _rand_string(rng)
    en = [f"Copy the letters one by one: {' '.join(s)}.", f"Together they spell {s}."]
    zh = [f"逐个抄写字母：{' '.join(s)}。", f"合起来就是{s}。"]
    return Task("copy", rng.choice([f"Copy this string: {s}", f"Repeat exactly: {s}"]),
                rng.choice([f"请原样复制：{s}", f"照抄这个字符串：{s}"]), s, _mutate(rng, s), en, zh,
                f"copy: {s} -> {s}")


def task_reverse(rng: random.Random) -> Task:
    s = _rand_string(rng)
    while s == s[::-1]:
        s = _rand_string(rng)
    r = s[::-1]
    wrong = s if rng.random() < 0.5 else _mutate(rng, r)
    en = [f"The letters are {' '.join(s)}.", f"Read them from last to first: {' '.join(r)}.", f"So the reverse is {r}."]
    zh = [f"字母依次是{' '.join(s)}。", f"从最后一个读到第一个：{' '.join(r)}。", f"所以反转后是{r}。"]
    return Task("reverse", rng.choice([f"Reverse the string {s}.", f"Write {s} backwards."]),
                rng.choice([f"把字符串{s}反过来写。", f"反转{s}。"]), r, wrong, en, zh, f"reverse: {s} -> {r}")


def task_count(rng: random.Random) -> Task:
    word = rng.choice(EN_WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice([c for c in LETTERS if c not in word])
    n = word.count(letter)
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    en, zh, k = [f"Look at each letter of {word} and count the {letter}s."], [f"逐个检查{word}里的字母，数{letter}的个数。"], 0
    for ch in word:
        if ch == letter:
            k += 1
            en.append(f"{ch}: match, count {k}.")
            zh.append(f"{ch}：是，计数{k}。")
        else:
            en.append(f"{ch}: no.")
            zh.append(f"{ch}：不是。")
    en.append(f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {word}.")
    zh.append(f"字母{letter}在{word}中出现了{n}次。")
    return Task("count", rng.choice([f"How many times does the letter {letter} appear in {word}?",
                                     f"Count the letter {letter} in the word {word}."]),
                f"字母{letter}在单词{word}中出现了几次？", f"{n}", f"{wrong}", en, zh, f"count {letter} in {word}: {n}")


def task_sort(rng: random.Random) -> Task:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    while len(set(xs)) < 2:  # all equal: no unsorted order exists
        xs = [rng.randint(0, 99) for _ in range(len(xs))]
    ys = sorted(xs)
    while ys == xs:
        rng.shuffle(xs)
    wrong = list(ys)
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    if wrong == ys:  # equal neighbours: use the input order instead
        wrong = list(xs)
    fmt = lambda v: " ".join(map(str, v))  # noqa: E731
    en, zh, left, out = [f"Sort {fmt(xs)} from smallest to largest by taking the smallest number each time."], \
        [f"把{fmt(xs)}从小到大排序，每次取出剩下最小的数。"], list(xs), []
    while left:
        m = min(left)
        left.remove(m)
        out.append(m)
        en.append(f"Smallest of the rest is {m}; sorted so far: {fmt(out)}.")
        zh.append(f"剩下最小的是{m}，目前排好：{fmt(out)}。")
    en.append(f"The sorted list is {fmt(ys)}.")
    zh.append(f"排序结果是{fmt(ys)}。")
    return Task("sort", rng.choice([f"Sort these numbers in ascending order: {fmt(xs)}", f"Sort: {fmt(xs)}"]),
                f"把这些数从小到大排序：{fmt(xs)}", fmt(ys), fmt(wrong), en, zh, f"sort: {fmt(xs)} -> {fmt(ys)}")


def random_task(rng: random.Random) -> Task:
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "copy", "reverse", "count", "sort"])
    return {"add": task_add, "sub": task_sub, "mul": task_mul, "copy": task_copy, "reverse": task_reverse,
            "count": task_count, "sort": task_sort}[kind](rng)


def answer_text(t: Task, zh: bool) -> str:
    """The assistant's answer sentence for a task."""
    return answer_for(t, t.answer, zh)


def answer_for(t: Task, ans: str, zh: bool) -> str:
    if t.kind in ("add", "sub", "mul"):
        return f"{ans}。" if zh else f"{ans}."
    if t.kind == "count":
        return f"{ans}次。" if zh else f"{ans}."
    return ans


# ------------------------------------------------------------------------------------------------------------
# Text generators


def en_story(rng: random.Random) -> str:
    n1, n2 = rng.sample(EN_NAMES, 2)
    place, animal, adj = rng.choice(EN_PLACES), rng.choice(EN_ANIMALS), rng.choice(EN_ADJS)
    day, weather, feel = rng.choice(EN_DAYS), rng.choice(EN_WEATHER), rng.choice(EN_FEELINGS)
    k, obj = rng.randint(2, 9), rng.choice(EN_OBJECTS)
    j = rng.randint(1, k - 1)
    sents = [
        f"On {day}, {n1} went to the {place} with {n2}.",
        f"The weather was {weather}, and {n1} felt {feel}.",
        f"Near the {place} they saw a {adj} {animal}.",
        f"{n2} had {k} {obj} and gave {j} of them to {n1}, so {n2} kept {k - j}.",
        f"In the evening they walked home and talked about the {animal}.",
    ]
    return " ".join(sents[:2] + rng.sample(sents[2:], rng.randint(1, 3)))


def zh_story(rng: random.Random) -> str:
    p1, p2 = rng.sample(ZH_PEOPLE, 2)
    place, act, time_ = rng.choice(ZH_PLACES), rng.choice(ZH_ACTIONS), rng.choice(ZH_TIMES)
    weather, adj, animal = rng.choice(ZH_WEATHER), rng.choice(ZH_ADJS), rng.choice(ZH_ANIMALS)
    obj, color = rng.choice(ZH_OBJECTS), rng.choice(ZH_COLORS)
    k = rng.randint(2, 9)
    j = rng.randint(1, k - 1)
    sents = [
        f"{time_}{weather}，{p1}和{p2}一起去{place}{act}。",
        f"他们在{place}看见了一只{adj}的{animal}。",
        f"{p1}带了{zh_number(k)}个{color}的{obj}，送给{p2}{zh_number(j)}个，自己还剩{zh_number(k - j)}个。",
        f"{p2}说：“今天真{adj}！”",
        f"回家以后，{p1}把今天的事情写在了日记里。",
    ]
    return "".join(sents[:1] + rng.sample(sents[1:], rng.randint(1, 3)))


def task_block(rng: random.Random) -> str:
    kind = rng.choice(["plain", "plain", "sentence", "zh"])
    lines = []
    for _ in range(rng.randint(4, 10)):
        t = random_task(rng)
        if kind == "plain":
            lines.append(t.plain)
        elif kind == "sentence":
            lines.append(f"Question: {t.prompt_en} Answer: {answer_text(t, False)}")
        else:
            lines.append(f"问：{t.prompt_zh} 答：{answer_text(t, True)}")
    return "\n".join(lines)


def facts_block(rng: random.Random) -> str:
    pool = FACTS_EN if rng.random() < 0.5 else FACTS_ZH
    return " ".join(a for _, a in rng.sample(pool, rng.randint(2, 4)))


# ------------------------------------------------------------------------------------------------------------
# The five files


def make_pretrain(rng: random.Random) -> list[dict]:
    docs = [{"text": p} for p in ENGLISH_PROSE + CHINESE_PROSE]
    zen = zen_of_python()
    docs += [{"text": "\n".join(zen[i:i + 5])} for i in range(0, len(zen), 5)]
    makers = [en_story, en_story, zh_story, zh_story, task_block, task_block, facts_block]
    while len(docs) < N_PRETRAIN:
        docs.append({"text": rng.choice(makers)(rng)})
    rng.shuffle(docs)
    return docs


def msg(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


def make_sft(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_SFT):
        conv = []
        zh = rng.random() < 0.4
        if rng.random() < 0.25:
            conv.append(msg("system", rng.choice(SYSTEM_PROMPTS)))
        r = rng.random()
        if r < 0.12:  # small talk or a fact
            q, a = rng.choice(SMALL_TALK + (FACTS_ZH if zh else FACTS_EN))
            conv += [msg("user", q), msg("assistant", a)]
        elif r < 0.62:  # one task
            t = random_task(rng)
            reasoning = rng.random() < 0.08
            extra = {"reasoning_content": "\n".join(t.steps_zh if zh else t.steps_en)} if reasoning else {}
            conv += [msg("user", t.prompt_zh if zh else t.prompt_en), msg("assistant", answer_text(t, zh), **extra)]
        elif r < 0.82:  # several tasks in a row
            for _ in range(rng.randint(2, 3)):
                t = random_task(rng)
                conv += [msg("user", t.prompt_zh if zh else t.prompt_en), msg("assistant", answer_text(t, zh))]
        else:  # addition with a follow-up that uses the previous result
            t = task_add(rng, 1, 2)
            total = int(t.answer.split("=")[1])
            k = rng.randint(1, 20)
            conv += [msg("user", t.prompt_zh if zh else t.prompt_en), msg("assistant", answer_text(t, zh))]
            conv += [msg("user", f"再加{k}呢？" if zh else f"Now add {k} to that."),
                     msg("assistant", f"{total}+{k}={total + k}。" if zh else f"{total}+{k}={total + k}.")]
        out.append({"conversations": conv})
    return out


def make_dpo(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_DPO):
        t = random_task(rng)
        zh = rng.random() < 0.3
        prompt = [msg("user", t.prompt_zh if zh else t.prompt_en)]
        if rng.random() < 0.2:
            prompt.insert(0, msg("system", rng.choice(SYSTEM_PROMPTS)))
        out.append({"chosen": prompt + [msg("assistant", answer_for(t, t.answer, zh))],
                    "rejected": [dict(m) for m in prompt] + [msg("assistant", answer_for(t, t.wrong, zh))]})
    return out


def make_reason(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_REASON):
        kind = rng.choice(["add", "add", "sub", "sub", "mul", "count", "sort", "reverse"])
        if kind in ("add", "sub"):
            t = (task_add if kind == "add" else task_sub)(rng, 2, 4)
        else:
            t = {"mul": task_mul, "count": task_count, "sort": task_sort, "reverse": task_reverse}[kind](rng)
        zh = rng.random() < 0.3
        steps = "\n".join(t.steps_zh if zh else t.steps_en)
        content = f"<think>\n{steps}\n</think>\n<answer>\n{answer_text(t, zh)}\n</answer>"
        out.append({"conversations": [msg("user", t.prompt_zh if zh else t.prompt_en), msg("assistant", content)]})
    return out


IDENTITY_Q_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "What are you?", "Who made you?",
                 "Are you ChatGPT?", "What model are you?", "Tell me about yourself.", "What can you do?",
                 "Hi! Who am I talking to?"]
IDENTITY_Q_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么模型？", "谁开发了你？", "你是ChatGPT吗？",
                 "你能做什么？", "请问你是哪个模型？", "跟我说说你自己吧。", "你好，你是谁呀？"]
IDENTITY_A_EN = [
    f"I am {MODEL_NAME}, a small language model implemented in JAX and Flax, based on the MiniMind project.",
    f"My name is {MODEL_NAME}. I am a tiny language model trained from scratch with JAX, following MiniMind.",
    f"I'm {MODEL_NAME}, a compact language model built with JAX/Flax. I can chat, do simple arithmetic and "
    "answer short questions.",
    f"I am {MODEL_NAME}, not ChatGPT. I am a small open model trained with JAX, based on MiniMind.",
]
IDENTITY_A_ZH = [
    f"我是{MODEL_NAME}，一个用JAX和Flax实现的小型语言模型，基于MiniMind项目。",
    f"我的名字叫{MODEL_NAME}，是一个用JAX从零开始训练的小语言模型。",
    f"我是{MODEL_NAME}，一个轻量的语言模型，可以聊天、做简单的算术、回答简短的问题。",
    f"我不是ChatGPT，我是{MODEL_NAME}，一个基于MiniMind、用JAX训练的小模型。",
]


def make_identity(rng: random.Random) -> list[dict]:
    out = []
    for i in range(N_IDENTITY):
        zh = i % 2 == 1
        qs, ans = (IDENTITY_Q_ZH, IDENTITY_A_ZH) if zh else (IDENTITY_Q_EN, IDENTITY_A_EN)
        conv = [msg("user", qs[(i // 2) % len(qs)]), msg("assistant", rng.choice(ans))]
        if rng.random() < 0.3:  # a follow-up turn
            t = random_task(rng)
            conv += [msg("user", t.prompt_zh if zh else t.prompt_en), msg("assistant", answer_text(t, zh))]
        if rng.random() < 0.2:
            conv.insert(0, msg("system", rng.choice(SYSTEM_PROMPTS[:2] + SYSTEM_PROMPTS[4:5])))
        out.append({"conversations": conv})
    return out


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# MiniMind-3's mocked agent tools (names and arguments as in its train_agent.py)
CALCULATOR = _tool("calculate_math", "计算数学表达式", {"expression": {"type": "string"}}, ["expression"])
CONVERTER = _tool("unit_converter", "单位换算", {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                             "to_unit": {"type": "string"}}, ["value", "from_unit", "to_unit"])
UNIT_FACTORS = {("km", "miles"): 0.621371, ("miles", "km"): 1.60934, ("kg", "pounds"): 2.20462,
                ("pounds", "kg"): 0.453592, ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048}
TOOL_SYSTEM = "# Tools\n你可以调用以下工具来回答问题。"


def _jdump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def tool_task(rng: random.Random) -> tuple[str, dict, str, str]:
    """(question, the call, the tool's result, the final answer) for a calculator or unit-conversion task."""
    if rng.random() < 0.6:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = rng.choice([f"{a} {op} {b} 等于多少？", f"What is {a} {op} {b}?", f"请帮我算一下 {a}{op}{b}。"])
        return q, {"name": "calculate_math", "arguments": {"expression": f"{a} {op} {b}"}}, str(value), str(value)
    (src, dst), factor = rng.choice(sorted(UNIT_FACTORS.items()))
    v = rng.randint(1, 200)
    value = round(v * factor, 4)
    q = rng.choice([f"{v} {src} 是多少 {dst}？", f"Convert {v} {src} to {dst}."])
    call = {"name": "unit_converter", "arguments": {"value": v, "from_unit": src, "to_unit": dst}}
    return q, call, str(value), f"{value} {dst}"


def make_sft_tools(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_TOOLS):
        q, call, result, answer = tool_task(rng)
        extra = {"reasoning_content": f"需要调用 {call['name']}。"} if rng.random() < 0.3 else {}
        final = f"结果是 {answer}。" if rng.random() < 0.5 else f"The answer is {answer}."
        out.append({"conversations": [
            msg("system", TOOL_SYSTEM, tools=_jdump([CALCULATOR, CONVERTER])), msg("user", q),
            msg("assistant", "", tool_calls=_jdump([call]), **extra),
            msg("tool", _jdump({"result": result})), msg("assistant", final)]})
    return out


def make_rlaif(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_RLAIF):
        kind = rng.choice(["add", "sub", "mul", "copy", "sort", "reverse"])
        t = {"add": task_add, "sub": task_sub, "mul": task_mul, "copy": task_copy, "sort": task_sort,
             "reverse": task_reverse}[kind](rng)
        zh = rng.random() < 0.3
        gt = t.answer.split("=")[-1] if kind in ("add", "sub", "mul") else t.answer
        out.append({"conversations": [msg("user", t.prompt_zh if zh else t.prompt_en), msg("assistant", "")],
                    "gt": gt})
    return out


def make_agent_rl(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(N_AGENT):
        q, _call, result, _answer = tool_task(rng)
        out.append({"conversations": [msg("system", TOOL_SYSTEM, tools=_jdump([CALCULATOR, CONVERTER])),
                                      msg("user", q), msg("assistant", "")], "gt": [result]})
    return out


MAKERS = {"pretrain.jsonl": make_pretrain, "sft.jsonl": make_sft, "dpo.jsonl": make_dpo,
          "reason.jsonl": make_reason, "lora_identity.jsonl": make_identity, "sft_tools.jsonl": make_sft_tools,
          "rlaif.jsonl": make_rlaif, "agent_rl.jsonl": make_agent_rl}


def build() -> dict[str, list[dict]]:
    """Every file's records, each from its own seeded generator."""
    return {name: MAKERS[name](random.Random(f"{SEED}/{name}")) for name in FILES}


def write(out_dir: str) -> dict[str, tuple[int, int]]:
    """Write the files into ``out_dir``; returns {file: (lines, bytes)}."""
    os.makedirs(out_dir, exist_ok=True)
    stats = {}
    for name, records in build().items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        stats[name] = (len(records), len(data))
    return stats


def check(out_dir: str) -> list[str]:
    """Regenerate in a temporary directory; the names of the files in ``out_dir`` that differ or are missing."""
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        return [name for name in FILES if not os.path.isfile(os.path.join(out_dir, name))
                or not filecmp.cmp(os.path.join(tmp, name), os.path.join(out_dir, name), shallow=False)]


def write_eval_samples(out_dir: str, n: int = 12) -> None:
    """Multiple-choice samples for the offline lm-eval tasks (eval/ceval.jsonl, cmmlu.jsonl, arc.jsonl):
    arithmetic questions with four numeric choices, in C-Eval's / CMMLU's (A-D letters) and ARC's layouts."""
    rng = random.Random(1234)
    rows = {"ceval": [], "cmmlu": [], "arc": []}
    for kind in rows:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            right = a + b
            choices = rng.sample([c for c in range(max(0, right - 6), right + 7) if c != right], 3) + [right]
            rng.shuffle(choices)
            answer = choices.index(right)
            if kind == "arc":
                rows[kind].append({"id": f"arc-{len(rows[kind])}", "question": f"What is {a} plus {b}?",
                                   "choices": {"text": [str(c) for c in choices], "label": list("ABCD")},
                                   "answerKey": "ABCD"[answer]})
            else:  # CMMLU capitalises its column names, C-Eval does not
                q, ans = ("Question", "Answer") if kind == "cmmlu" else ("question", "answer")
                rows[kind].append({"id": len(rows[kind]), q: f"{a}加{b}等于多少？",
                                   **{k: str(c) for k, c in zip("ABCD", choices)}, ans: "ABCD"[answer]})
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    for kind, records in rows.items():
        with open(os.path.join(out_dir, "eval", f"{kind}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: data/sample)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate in a temporary directory and compare with the files in --out")
    args = parser.parse_args(argv)
    if args.check:
        bad = check(args.out)
        if bad:
            print(f"sample data in {args.out} differs from a fresh build: {', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"sample data in {args.out} is up to date ({len(FILES)} files identical)")
        return 0
    stats = write(args.out)
    write_eval_samples(args.out)
    for name, (lines, size) in stats.items():
        print(f"{name:22s} {lines:6d} lines {size / 1024:9.1f} KiB")
    total = sum(s for _, s in stats.values())
    print(f"{'total':22s} {sum(n for n, _ in stats.values()):6d} lines {total / 1024:9.1f} KiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
