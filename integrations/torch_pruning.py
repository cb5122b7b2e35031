"""torch-pruning glue (public names): ``channel_pruner`` builds a torch-pruning pruner configured right for models
holding depth gates (the traps it handles are listed in ``resconv_plugin.pruning.channels``, where it lives, because
the joint depth + width pruner of the core uses it too); ``replay_channel_pruning`` redoes a recorded history.
"""

from resconv_plugin.deploy.channel_replay import replay_channel_pruning
from resconv_plugin.pruning.channels import channel_pruner, classifier_of

__all__ = ["channel_pruner", "classifier_of", "replay_channel_pruning"]
