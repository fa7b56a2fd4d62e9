import pytest

from fgl_client.silo import load_silo
from fgl_core.config import RunConfig


def test_simulated_silos_split_the_shared_dataset(blood_npz):
    cfg = RunConfig.from_flower(
        {"dataset": str(blood_npz), "train-subset": 1000, "eval-subset": 300}
    )
    silos = [load_silo(cfg, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert sum(len(s.train) for s in silos) == 1000
    assert sum(len(s.test) for s in silos) == 300
    assert silos[0].class_names[0] == "basophil" and silos[1].name == "partition 1/3"


def test_node_local_data_path_is_the_silos_own_dataset(retina_npz, blood_npz):
    cfg = RunConfig.from_flower({"dataset": str(blood_npz)})
    silo = load_silo(cfg, {"data-path": str(retina_npz), "partition-id": 0, "num-partitions": 2})
    assert silo.name == str(retina_npz) and silo.num_classes == 5
    assert len(silo.test) == 400


def test_node_config_without_data_says_what_it_needs():
    with pytest.raises(ValueError, match=r"'data-path'.*'partition-id' and 'num-partitions'"):
        load_silo(RunConfig(), {"something": 1})


def test_a_silo_tells_the_server_only_that_its_data_is_not_usable(tmp_path, caplog):
    from fgl_client.silo import SiloDataUnusable, open_silo

    cfg = RunConfig.from_flower({})
    missing, broken = tmp_path / "nope.npz", tmp_path / "junk.npz"
    broken.write_bytes(b"junk")
    replies = []
    for path in (missing, broken):
        with pytest.raises(SiloDataUnusable) as err:
            open_silo(cfg, {"data-path": str(path)})
        replies.append(str(err.value).replace(path.name, "X"))
    assert replies[0] == replies[1]  # existence is not told apart
    assert "does not exist" in caplog.text and "not a readable .npz" in caplog.text
