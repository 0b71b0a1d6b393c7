// ledgerq dashboard: reload the page every data-refresh seconds unless the
// operator is in the middle of something (a box ticked, a field being typed
// in); "select all" for the dead tasks; a confirmation on data-confirm forms.
(function () {
  "use strict";
  var body = document.body;
  var seconds = parseInt(body.getAttribute("data-refresh") || "0", 10);
  var busy = function () {
    var active = document.activeElement;
    if (active && (active.tagName === "INPUT" || active.tagName === "SELECT" ||
                   active.tagName === "TEXTAREA") && active.type !== "checkbox") {
      return true;
    }
    return document.querySelector("input[type=checkbox][name=task_id]:checked") !== null;
  };
  if (seconds > 0) {
    window.setInterval(function () {
      if (!busy() && document.visibilityState !== "hidden") { window.location.reload(); }
    }, seconds * 1000);
  }
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      var boxes = document.querySelectorAll("input[type=checkbox][name=task_id]");
      for (var i = 0; i < boxes.length; i++) { boxes[i].checked = all.checked; }
    });
  }
  var forms = document.querySelectorAll("form[data-confirm]");
  for (var i = 0; i < forms.length; i++) {
    forms[i].addEventListener("submit", function (event) {
      if (!window.confirm(this.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  }
})();
