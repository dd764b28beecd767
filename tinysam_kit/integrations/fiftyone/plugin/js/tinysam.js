/*
 * TinySAM kit: the FiftyOne App part of the @tinysam-kit/tinysam plugin.
 *
 * Plain browser JavaScript, no build step. The App loads this file with a <script> tag (fiftyone.yml:
 * js_bundle) and exposes its own packages as window globals: __foo__ (@fiftyone/operators), __fos__
 * (@fiftyone/state) and recoil.
 *
 * One operator, "refresh_open_sample", which the Python operator "segment_selected_labels" triggers after it
 * has written masks. It shows them in the open sample modal without a page reload:
 *   1. reloads the dataset schema when the output field is new (the grid sidebar learns it) and copies the
 *      field into the modal sidebar, whose groups are copied from the grid only when the modal opens;
 *   2. makes the field active (drawn) in the modal;
 *   3. pushes the written sample into the App's sample caches and lookers (@fiftyone/state's
 *      useUpdateSamples, the hook the App itself uses after saving annotations), so the modal redraws it and
 *      closing and reopening the sample shows it too;
 *   4. for a new field, has the modal recreate its looker (the looker's "reset" event), because a looker
 *      decodes and draws only the fields of the schema it was created with.
 * The Python side sends the sample in the form of the App's own sample queries (fiftyone.core.json.stringify).
 */
(function () {
  "use strict";

  var PLUGIN = "@tinysam-kit/tinysam";
  var foo = window.__foo__;
  var fos = window.__fos__;
  var recoil = window.recoil;

  if (!foo || !fos || !recoil || !foo.Operator || !fos.useUpdateSamples) {
    console.warn(PLUGIN + ": this FiftyOne App does not expose the APIs the plugin's App part needs");
    return;
  }

  var SCHEMA_TIMEOUT_MS = 10000;

  function sleep(ms) {
    return new Promise(function (resolve) {
      setTimeout(resolve, ms);
    });
  }

  function hasPath(groups, path) {
    return (groups || []).some(function (group) {
      return (group.paths || []).indexOf(path) >= 0;
    });
  }

  /* The modal's sidebar groups with every path of the grid's groups that it lacks (new fields). */
  function mergeGroups(modalGroups, gridGroups) {
    var merged = (modalGroups || []).map(function (group) {
      return Object.assign({}, group, { paths: (group.paths || []).slice() });
    });
    (gridGroups || []).forEach(function (gridGroup) {
      var missing = (gridGroup.paths || []).filter(function (path) {
        return !hasPath(merged, path);
      });
      if (!missing.length) return;
      var target = merged.find(function (group) {
        return group.name === gridGroup.name;
      });
      if (target) {
        target.paths = target.paths.concat(missing);
      } else {
        merged.push(Object.assign({}, gridGroup, { paths: missing }));
      }
    });
    return merged;
  }

  function knowsField(looker, field, newField) {
    var config = looker.state && looker.state.config;
    var schema = config && config.fieldSchema;
    return schema ? Boolean(schema[field.split(".")[0]]) : !newField;
  }

  class RefreshOpenSample extends foo.Operator {
    get config() {
      return new foo.OperatorConfig({
        name: "refresh_open_sample",
        label: "TinySAM: show written masks in the open sample",
        unlisted: true,
      });
    }

    useHooks() {
      return {
        updateSamples: fos.useUpdateSamples(),
        reloadDataset: fos.useRefresh(),
        // Each call reads the state as it is now (a fresh snapshot).
        read: recoil.useRecoilCallback(function (cb) {
          return function (state) {
            return cb.snapshot.getLoadable(state).contents;
          };
        }, []),
        write: recoil.useRecoilCallback(function (cb) {
          return function (state, value) {
            cb.set(state, value);
          };
        }, []),
      };
    }

    async execute(ctx) {
      var hooks = ctx.hooks;
      var field = ctx.params.field;
      var sample = ctx.params.sample;
      var newField = false;

      if (field) {
        var grid = fos.sidebarGroupsDefinition(false);
        var modal = fos.sidebarGroupsDefinition(true);
        if (!hasPath(hooks.read(grid), field)) {
          newField = true;
          hooks.reloadDataset();
          var deadline = Date.now() + SCHEMA_TIMEOUT_MS;
          while (!hasPath(hooks.read(grid), field) && Date.now() < deadline) {
            await sleep(50);
          }
        }
        if (!hasPath(hooks.read(modal), field)) {
          hooks.write(modal, mergeGroups(hooks.read(modal), hooks.read(grid)));
        }
        var activeState = fos.activeFields({ modal: true });
        var active = hooks.read(activeState) || [];
        if (active.indexOf(field) < 0) {
          hooks.write(activeState, active.concat([field]));
        }
      }

      if (sample && sample._id) {
        hooks.updateSamples([[sample._id, sample]]);
      }

      // A looker draws only the fields of the schema it was created with: for a new field the modal has to
      // create a new one, which the looker's "reset" event asks for (the retry button of its error page).
      var looker = hooks.read(fos.modalLooker);
      if (field && looker && typeof looker.dispatchEvent === "function" && !knowsField(looker, field, newField)) {
        await sleep(0); // let the modal render with the new schema first
        looker.dispatchEvent("reset");
      }
    }
  }

  foo.registerOperator(RefreshOpenSample, PLUGIN);
})();
