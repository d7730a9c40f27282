"""The checked-in gRPC code is what `make proto` generates from km/v1/*.proto."""

from vqkd.km import protogen


def test_generated_code_is_up_to_date(capsys):
    assert protogen.main(["--check"]) == 0, capsys.readouterr().err
