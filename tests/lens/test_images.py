import re

import pytest

from gqa_core.lens.images import ImageInputError, load_image

from support.bad_images import ACCEPTED, REJECTED, write_all
from support import EXAMPLES_DIR


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp('bad-images'), EXAMPLES_DIR / 'cifar10_cat.jpg')


@pytest.mark.parametrize('kind', sorted(REJECTED))
def test_bad_files_raise_a_message_naming_the_problem(files, kind):
    with pytest.raises(ImageInputError, match=re.escape(REJECTED[kind])) as err:
        load_image(str(files[kind]))
    assert files[kind].name in str(err.value)


@pytest.mark.parametrize('kind', sorted(ACCEPTED))
def test_unusual_images_become_rgb_with_a_note(files, kind):
    loaded = load_image(str(files[kind]))
    assert loaded.image.mode == 'RGB'
    assert any(ACCEPTED[kind] in note for note in loaded.notes), loaded.notes


def test_bomb_is_refused_from_the_header_without_decoding(files):
    import tracemalloc
    tracemalloc.start()
    with pytest.raises(ImageInputError, match='(?s)decompression-bomb guard.*400000000'):
        load_image(str(files['bomb']))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20, f'{peak / 2**20:.0f} MiB allocated: the pixels were decoded'


def test_an_image_only_the_apps_own_limit_refuses_is_refused_in_one_line(files):
    """Between the app's MAX_PIXELS and Pillow's own limit (where Pillow would decode it without a word): the
    app's header check is all that stands between it and 56 M decoded pixels."""
    from PIL import Image
    from gqa_core.lens.images import MAX_PIXELS
    from support.bad_images import OVER_APP_LIMIT
    width, height = OVER_APP_LIMIT
    assert MAX_PIXELS < width * height < Image.MAX_IMAGE_PIXELS
    with Image.open(files['over_app_limit']) as img:
        assert img.size == OVER_APP_LIMIT
    with pytest.raises(ImageInputError) as refused:
        load_image(str(files['over_app_limit']))
    message = str(refused.value)
    assert message == ('large.png is 8000x7000 = 56,000,000 pixels, over the 50,000,000-pixel limit '
                       '(decompression-bomb guard); downscale it first'), message


def test_missing_inputs():
    with pytest.raises(ImageInputError, match='no image given'):
        load_image(None)
    with pytest.raises(ImageInputError, match='not found'):
        load_image('/nonexistent/cat.png')


def test_plain_rgb_has_no_notes():
    loaded = load_image(str(EXAMPLES_DIR / 'grace_hopper.jpg'))
    assert loaded.notes == [] and loaded.image.size == (512, 600)
