/* Detection on raw float32 slices through the fcd C ABI (include/fcd.h).
 *
 *   detect CONFIG UNET FLAIR T1 SEED STEPS PSEUDO_HEALTHY_OUT ANOMALY_OUT [DEVICE]
 *
 * FLAIR and T1 hold slices of image_size x image_size, little-endian float32, one after
 * another (numpy: a.astype("<f4").tofile(path)). The outputs are written the same way:
 * the pseudo-healthy FLAIR and the anomaly maps, one float per pixel. STEPS 0 takes the
 * config's noise level; DEVICE is auto (the default), cpu or cuda; the classifier is the
 * config's ckpt_path. Build and run (from the repository root):
 *
 *   cargo build --release -p fcd-capi
 *   cc -std=c99 -Wall -Wextra -O2 -Iinclude examples/c/detect.c \
 *      -Ltarget/release -lfcd_capi -Wl,-rpath,"$PWD/target/release" -o target/detect
 *   target/detect config.yaml unet.pt flair.f32 t1.f32 7 100 healthy.f32 anomaly.f32
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fcd.h"

/* The whole file at `path` as floats; its count in `*n`. NULL (and a message) on failure. */
static float *read_floats(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return NULL;
    }
    float *data = NULL;
    long bytes = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (bytes = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        *n = (size_t)bytes / sizeof(float);
        /* + 1: an empty file is refused later, not taken for an allocation failure. */
        data = malloc(*n * sizeof(float) + 1);
        if (data && fread(data, sizeof(float), *n, f) != *n) {
            free(data);
            data = NULL;
        }
    }
    if (!data)
        fprintf(stderr, "%s: cannot read\n", path);
    fclose(f);
    return data;
}

static int write_floats(const char *path, const float *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(data, sizeof(float), n, f) == n;
    if (f && fclose(f) != 0)
        ok = 0;
    if (!ok)
        fprintf(stderr, "%s: cannot write\n", path);
    return ok;
}

int main(int argc, char **argv)
{
    if (argc != 9 && argc != 10) {
        fprintf(stderr,
                "usage: %s CONFIG UNET FLAIR T1 SEED STEPS PSEUDO_HEALTHY_OUT ANOMALY_OUT "
                "[DEVICE]\n",
                argv[0]);
        return 2;
    }
    const char *device = argc == 10 ? argv[9] : "auto";
    FcdEngine *engine = fcd_engine_new(argv[1], argv[2], NULL, device, "fp32");
    if (!engine) {
        fprintf(stderr, "fcd: %s\n", fcd_last_error());
        return 1;
    }
    int status = 1;
    size_t size = fcd_engine_image_size(engine), n_flair = 0, n_t1 = 0;
    float *flair = read_floats(argv[3], &n_flair);
    float *t1 = read_floats(argv[4], &n_t1);
    float *healthy = NULL, *anomaly = NULL;
    if (!flair || !t1)
        goto done;
    if (n_flair != n_t1 || n_flair == 0 || n_flair % (size * size) != 0) {
        fprintf(stderr, "%s and %s: expected the same number of %zu x %zu float32 slices\n",
                argv[3], argv[4], size, size);
        goto done;
    }
    size_t slices = n_flair / (size * size);
    healthy = malloc(n_flair * sizeof(float));
    anomaly = malloc(n_flair * sizeof(float));
    if (!healthy || !anomaly) {
        fprintf(stderr, "out of memory\n");
        goto done;
    }
    uint64_t seed = strtoull(argv[5], NULL, 10);
    size_t steps = (size_t)strtoull(argv[6], NULL, 10);
    /* NAN: the config's guidance scale. */
    if (fcd_detect(engine, flair, t1, slices, size, size, seed, steps, NAN, true, healthy,
                   anomaly) != FCD_STATUS_OK) {
        fprintf(stderr, "fcd: %s\n", fcd_last_error());
        goto done;
    }
    if (write_floats(argv[7], healthy, n_flair) && write_floats(argv[8], anomaly, n_flair)) {
        printf("%zu slices of %zu x %zu\n", slices, size, size);
        status = 0;
    }
done:
    free(flair);
    free(t1);
    free(healthy);
    free(anomaly);
    fcd_engine_free(engine);
    return status;
}
