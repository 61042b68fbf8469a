"""The attention core: grouping policies, the drop-in attention module, conversion from MHA, introspection."""
