from seed_fast.train.config import STAGES, TrainConfig
from seed_fast.train.stages import TASKS
from seed_fast.train.task import Task


def test_every_stage_has_a_config_section_and_a_task():
    assert tuple(TASKS) == STAGES
    assert all(issubclass(task, Task) for task in TASKS.values())
    sections = TrainConfig(stage="stage1", out="run", steps=1, global_batch=1).to_dict()
    assert all(isinstance(sections[stage], dict) for stage in STAGES)
