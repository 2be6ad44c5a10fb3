"""The training stages: each stage's name (a section of TrainConfig) and the Task that trains it."""

from .decoder import DecoderTask
from .flamingo import FlamingoTask
from .lavit import LavitTask
from .llm import LLMTask
from .stage1 import Stage1Task
from .stage2 import Stage2Task
from .vae import VaeTask
from .vwlmm import VwlmmTask

TASKS = {
    "stage1": Stage1Task,
    "stage2": Stage2Task,
    "llm": LLMTask,
    "vae": VaeTask,
    "decoder": DecoderTask,
    "lavit": LavitTask,
    "flamingo": FlamingoTask,
    "vwlmm": VwlmmTask,
}
