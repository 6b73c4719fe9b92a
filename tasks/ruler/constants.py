"""RULER's prompt templates, answer prefixes and generation budgets (benchmark facts, character for character).

Source: NVIDIA/RULER scripts/data/synthetic/constants.py and scripts/data/synthetic/niah.py. RULER appends the
answer prefix to the template, counts tokens on the joined text, then splits it off again; a sample keeps
``input`` (template part) and ``answer_prefix`` apart and the model is fed ``input + answer_prefix``.
"""

# ---- niah -------------------------------------------------------------------------------------------------------
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"

# RULER derives the singular wording (queries x values == 1) by string replacement on template + answer prefix
# ("Some"->"A", "are all"->"is", "are"->"is", type_needle_v without its final "s"). Written out here; a test checks
# that it equals the replacement rule applied to the plural strings.
NIAH_TEMPLATE_SINGULAR = (
    "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What is the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX_SINGULAR = " The special magic {type_needle_v} for {query} mentioned in the provided text is"

# The needle always uses the plural type name ("numbers", "uuids", "words").
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

# ---- variable tracking ------------------------------------------------------------------------------------------
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)

# ---- common words extraction ------------------------------------------------------------------------------------
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
    "above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

# ---- frequent words extraction ----------------------------------------------------------------------------------
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# ---- generation budgets (max_new_tokens, greedy) -----------------------------------------------------------------
TOKENS_TO_GENERATE = {
    "niah": 128,
    "variable_tracking": 30,
    "common_words_extraction": 120,
    "freq_words_extraction": 50,
    "qa": 32,
}

# Needle depths (percent of the essay's sentences) that RULER draws from without replacement:
# np.round(np.linspace(0, 100, 40)). No value is within float error of .5, so Python's round() agrees.
DEPTHS = tuple(int(round(100 * i / 39)) for i in range(40))

# Haystack size steps RULER uses when it shrinks a sample that does not fit. We shrink by an estimate of the
# overshoot instead (see length.py) and keep these only as documentation of the original knobs.
RULER_INCREMENTAL = {"essay": 500, "noise": 25, "needle": 25, "noise_below_4k": 5}
