"""The contracts as pytest tests: ``pytest --pyargs resumekit.properties``.

Runs the allocator state machine on resumekit's allocator (both reuse orders), the
protocol machine with the epoch strategy and the vLLM connector's machine, under the
Hypothesis profile ``HYPOTHESIS_PROFILE`` names (``ci`` by default, ``fuzz`` for long runs).
"""

from __future__ import annotations

from resumekit.properties.allocator_machine import resumekit_allocator_machine
from resumekit.properties.connector_machine import ConnectorMachine
from resumekit.properties.profiles import load_profile
from resumekit.properties.protocol_machine import protocol_machine

load_profile()

TestAllocatorLifo = resumekit_allocator_machine(8, 4, "lifo").TestCase
TestAllocatorFifo = resumekit_allocator_machine(8, 4, "fifo").TestCase
TestProtocolEpoch = protocol_machine("epoch").TestCase
TestVllmConnector = ConnectorMachine.TestCase
