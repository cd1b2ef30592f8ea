"""Job generation: a recipe and its config → a torchrun command (one node) or an sbatch script (Slurm).

Pure functions (`plan_job`, `torchrun_command`, `sbatch_script`, `pipeline_submit_script`) turn
configs into text; `launchers.submit` writes job directories and calls sbatch; `python -m launchers`
is the command line. See docs/launching.md.
"""

from launchers.config import ClusterConfig, ContainerConfig, Launcher, Scheduler, compose_cluster
from launchers.pipeline import PipelineSpec, load_pipeline, plan_pipeline
from launchers.plan import JobPlan, WorldPlan, plan_job, plan_world
from launchers.scripts import local_command_line, local_script, pipeline_submit_script, sbatch_script, torchrun_command

__all__ = [
    "ClusterConfig",
    "ContainerConfig",
    "JobPlan",
    "Launcher",
    "PipelineSpec",
    "Scheduler",
    "WorldPlan",
    "compose_cluster",
    "load_pipeline",
    "local_command_line",
    "local_script",
    "pipeline_submit_script",
    "plan_job",
    "plan_pipeline",
    "plan_world",
    "sbatch_script",
    "torchrun_command",
]
