"""The contract scenarios, one module per CONTRACT.md section.

Run them against any broker with ``pytest --pyargs unibus_contract.scenarios
--unibus-url URL`` (see ``docs/contract.md``).
"""
