"""The SuperNI tasks held out of long-prompt training, as fixed lists with the seeded rules that drew them:
`LONG_DEV_TASKS` for the long dev split that results are reported on, and `LONG_TUNE_TASKS` for the tuning split
that recipes are chosen on. A task list of `gistcache.data.kshot` names them as LONG_DEV and LONG_TUNE."""

from __future__ import annotations

import random

# The long dev split's tasks: held out of long-prompt training. Picked by a seeded draw before any result
# was seen, from the tasks of ../shared/data/superni/superni_train.json that have 12 rows (so each row has
# 11 possible shots), leaving out the 4 tasks whose kept rows all carry one label (superni/README.md):
#     eligible = sorted(tasks with 12 rows) minus those 4;  sorted(random.Random(23).sample(eligible, 24))
# (tests/data/test_kshot.py checks the draw against the data file when it is there.)
LONG_DEV_TASKS: tuple[str, ...] = (
    "task064_all_elements_except_first_i",
    "task065_timetravel_consistent_sentence_classification",
    "task066_timetravel_binary_consistency_classification",
    "task088_identify_typo_verification",
    "task1205_atomic_classification_isafter",
    "task1309_amazonreview_summary_classification",
    "task1331_reverse_array",
    "task1427_country_region_in_world",
    "task1451_drug_dose_extraction",
    "task1486_cell_extraction_anem_dataset",
    "task1584_evalution_meronym_classification",
    "task1596_event2mind_text_generation_2",
    "task1603_smcalflow_sentence_generation",
    "task1703_ljspeech_textmodification",
    "task1731_quartz_question_answering",
    "task372_synthetic_palindrome_numbers",
    "task376_reverse_order_of_words",
    "task413_mickey_en_sentence_perturbation_generation",
    "task506_position_of_all_alphabetical_elements_in_list",
    "task523_find_if_numbers_or_alphabets_are_more_in_list",
    "task580_socialiqa_answer_generation",
    "task636_extract_and_sort_unique_alphabets_in_a_list",
    "task834_mathdataset_classification",
    "task956_leetcode_420_strong_password_check",
)
LONG_DEV_SEED = 23
LONG_DEV_SIZE = 24
CONSTANT_LABEL_TASKS = ("task150_afs_argument_quality_gun_control", "task1548_wiqa_binary_classification",
                        "task512_twitter_emotion_classification", "task855_conv_ai_2_classification")
# The long tuning split's tasks: held out of long-prompt training too, so that recipes are chosen on them and
# LONG_DEV is only reported. Drawn the same way from the eligible tasks outside LONG_DEV (2026-12-04, before
# any result on them was seen):  sorted(random.Random(41).sample(eligible minus LONG_DEV_TASKS, 20)).
LONG_TUNE_TASKS: tuple[str, ...] = (
    "task063_first_i_elements",
    "task1294_wiki_qa_answer_verification",
    "task1338_peixian_equity_evaluation_corpus_sentiment_classifier",
    "task1341_msr_text_classification",
    "task1383_quarel_write_incorrect_answer",
    "task1399_obqa_answer_generation",
    "task1446_farthest_integers",
    "task1498_24hour_to_12hour_clock",
    "task1506_celebrity_minimal_dob_span",
    "task298_storycloze_correct_end_classification",
    "task369_synthetic_remove_odds",
    "task471_haspart_answer_generation",
    "task492_mwsc_incorrect_answer_generation",
    "task517_emo_classify_emotion_of_dialogue",
    "task586_amazonfood_polarity_classification",
    "task610_conllpp_ner",
    "task751_svamp_subtraction_question_answering",
    "task850_synthetic_longest_palindrome",
    "task852_synthetic_multiply_odds",
    "task860_prost_mcq_generation",
)
LONG_TUNE_SEED = 41
LONG_TUNE_SIZE = 20
# a task list may name these sets, alone or among names: LONG_DEV,LONG_TUNE
LONG_DEV_NAME = "LONG_DEV"
LONG_TUNE_NAME = "LONG_TUNE"
NAMED_TASK_SETS = {LONG_DEV_NAME: LONG_DEV_TASKS, LONG_TUNE_NAME: LONG_TUNE_TASKS}


def eligible_tasks(task_counts: dict[str, int]) -> list[str]:
    """The tasks the named sets are drawn from: 12 rows each (11 possible shots), not one label throughout."""
    return sorted(t for t, n in task_counts.items() if n == 12 and t not in CONSTANT_LABEL_TASKS)


def draw_long_dev_tasks(task_counts: dict[str, int]) -> list[str]:
    """The rule that picked LONG_DEV_TASKS, given {task: number of rows} of superni_train.json."""
    return sorted(random.Random(LONG_DEV_SEED).sample(eligible_tasks(task_counts), LONG_DEV_SIZE))


def draw_long_tune_tasks(task_counts: dict[str, int]) -> list[str]:
    """The rule that picked LONG_TUNE_TASKS: the same draw from the eligible tasks outside LONG_DEV_TASKS."""
    eligible = [t for t in eligible_tasks(task_counts) if t not in LONG_DEV_TASKS]
    return sorted(random.Random(LONG_TUNE_SEED).sample(eligible, LONG_TUNE_SIZE))
