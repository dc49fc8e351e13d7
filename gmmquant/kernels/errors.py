"""Exception types of the kernel layer."""


class GMMContractError(ValueError):
    """An argument of `grouped_matmul` breaks a rule of the npu_grouped_matmul spec.

    The message starts with the rule's name in brackets (e.g. ``[group_list.monotonic]``) and shows the
    offending values, so that a call which would fail on an NPU fails here first, with a reason.
    """

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"[{rule}] {message}")
